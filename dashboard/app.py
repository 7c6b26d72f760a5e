"""headroom's operator dashboard: a Streamlit client of the control plane's gRPC API.

    HEADROOM_OPERATOR=alice headroom-dashboard --address 127.0.0.1:50051

It never opens DuckDB: everything goes through the Admin and Query RPCs (dashboard/client.py).
"""
import sys

import streamlit as st

from headroom_sidecar.dashboard import ui
from headroom_sidecar.dashboard.settings import DashboardSettings

# No page_icon and no st.Page icons: each becomes the favicon, which the browser fetches from
# fonts.gstatic.com; the dashboard must work with no network (the browser test checks it).
st.set_page_config(page_title="headroom", layout="wide")

try:
    settings = DashboardSettings.resolve(sys.argv[1:])
except (ValueError, TypeError) as e:
    st.error(f"The dashboard's settings are invalid: {e}")
    st.stop()

ctx = ui.make_context(settings)
st.sidebar.title("headroom")
ui.sidebar_status(ctx)
pages = [st.Page("screens/fleet.py", title="Fleet", url_path="fleet", default=True),
         st.Page("screens/internals.py", title="Model internals", url_path="internals"),
         st.Page("screens/decisions.py", title="Decisions", url_path="decisions"),
         st.Page("screens/approvals.py", title="Approvals", url_path="approvals"),
         st.Page("screens/audit.py", title="Audit log", url_path="audit"),
         st.Page("screens/classes.py", title="Query classes", url_path="classes")]
st.navigation(pages).run()
