"""Layer 1: token grids, the proxy geometry and the window reorder (torch index tensors, no model code)."""

from .grid import Grid, ProxyGeometry, latent_grid, token_grid
from .windows import WindowLayout, WindowSpec, proxy_regions, window_layout

__all__ = [
    "Grid",
    "ProxyGeometry",
    "latent_grid",
    "token_grid",
    "WindowSpec",
    "WindowLayout",
    "window_layout",
    "proxy_regions",
]
