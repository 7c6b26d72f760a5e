"""The internals page: see dashboard/views/internals.py."""
from dashboard import ui
from dashboard.views import internals

ui.guarded(ui.context(), internals.render)
