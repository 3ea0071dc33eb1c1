"""firmad's version, and the versions of what a result or a saved detector was made with.

Light on purpose (`firmad --version` imports it): the libraries are imported when asked for.
"""

from __future__ import annotations

import platform

__version__ = "0.1.0"


def versions() -> dict[str, str | None]:
    """Versions of firmad, its main dependencies and Python (None for a missing package)."""
    import numpy as np
    import sklearn
    import torch
    import torchvision

    try:
        import faiss

        faiss_version = getattr(faiss, "__version__", "unknown")
    except ImportError:
        faiss_version = None
    return {
        "firmad": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
        "faiss": faiss_version,
        "python": platform.python_version(),
    }
