"""Reports and the feature browser: static HTML built from artifacts, plots, and a small local server.

    from monoscope.report import build_browser, serve
    build_browser("runs/stats", "runs/browser")
    serve("runs/browser")            # or open runs/browser/index.html directly
"""
from monoscope.report.browser import build_browser, load_explanations, StatsArtifact
from monoscope.report.serve import activations_for_text, make_server, serve

__all__ = ["build_browser", "load_explanations", "StatsArtifact", "activations_for_text", "make_server", "serve"]
