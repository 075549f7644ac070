"""Loaded with LAB_PLUGINS=tests.plugin_untested_uvicorn before the service installs its guards: makes
the installed uvicorn report a version the project never tested, as a fresh install with a newer
uvicorn would. The service must then refuse to start (or, with LAB_ALLOW_UNGUARDED=1, say it is unguarded)."""
import uvicorn

uvicorn.__version__ = "0.999.0"
