"""The offline feature dashboard: a static site (and notebook views) of an ``analyze`` output.

    from saepipe.dashboard import build_site, serve, FeatureView
    build_site("data/analyze/6.mlp/default", "data/dashboard/6.mlp/default")  # then open its index.html
    with serve("data/dashboard") as srv:               # or serve it on 127.0.0.1
        print(srv.url)
    FeatureView.from_analysis("data/analyze", 123)     # one latent, renders in a notebook

Self-contained: depends on the standard library, numpy and pyarrow only. The data contract (the files
``analyze`` writes) is described in :mod:`saepipe.dashboard.data`; ``python -m saepipe.dashboard``
builds, serves, screenshots, or writes a synthetic analysis for development.
"""

from saepipe.dashboard.data import Analysis, ContractError, load_analysis, load_feature_record
from saepipe.dashboard.render import FeatureView, render_feature_html
from saepipe.dashboard.serve import DashboardServer, serve
from saepipe.dashboard.site import SiteInfo, build_site

__all__ = [
    "Analysis",
    "ContractError",
    "DashboardServer",
    "FeatureView",
    "SiteInfo",
    "build_site",
    "load_analysis",
    "load_feature_record",
    "render_feature_html",
    "serve",
]
