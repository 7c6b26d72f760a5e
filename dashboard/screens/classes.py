"""The query classes page: see dashboard/views/classes.py."""
from headroom_sidecar.dashboard import ui
from headroom_sidecar.dashboard.views import classes

ui.guarded(ui.context(), classes.render)
