"""attrctl — policy-as-config attribute-controlled fine-tuning of language models.

Importing attrctl is cheap and side-effect free: no torch device probing, no Triton import,
no model loading. Heavy modules are imported where they are used.
"""

from attrctl.errors import AssetError, AttrctlError, PolicyError

__version__ = "0.1.0"

__all__ = ["AssetError", "AttrctlError", "PolicyError", "__version__"]
