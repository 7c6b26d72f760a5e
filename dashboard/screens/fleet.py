"""The fleet page: see dashboard/views/fleet.py."""
from dashboard import ui
from dashboard.views import fleet

ui.guarded(ui.context(), fleet.render)
