"""The internals page: see dashboard/views/internals.py."""
from headroom_sidecar.dashboard import ui
from headroom_sidecar.dashboard.views import internals

ui.guarded(ui.context(), internals.render)
