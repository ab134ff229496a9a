"""The JupyterLab extension's server side (hardware picker, cost and status REST).

Not built yet: it has its own issue. The package exists so the wheel layout is final.
"""

from __future__ import annotations

__all__: list[str] = []
