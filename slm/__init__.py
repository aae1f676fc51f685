"""slm: small specialized language models with cheap inference from limited domain data, on Ray.

The repository's top-level folders (pipeline/, models/, tune/, cluster/, deploy/) are installed
as sub-packages of this one namespace: ``slm.pipeline``, ``slm.models`` and so on.
"""

__version__ = "0.1.0"
