"""`llmtune ui`: the whole lifecycle in a browser - runs and their live state, a new run from the recipe schema,
curves as they grow, stop and resume, compare, chat / classify, export, merge and push.

A view over what is on disk and over `llmtune.api`, never a second implementation: a run's state comes from its
folder (llmtune/ui/runs.py), launches are the `llmtune train` command a user would type, run detached
(llmtune/ui/jobs.py), the form is the recipe schema and its checks are the loader's (llmtune/ui/forms.py).
app.py builds the FastAPI app; routes_runs.py, routes_new.py and routes_use.py hold its endpoints; static/ the page.
"""

from llmtune.ui.app import check_host, make_app, run_ui
from llmtune.ui.settings import UiSettings

__all__ = ["UiSettings", "check_host", "make_app", "run_ui"]
