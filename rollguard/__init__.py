"""rollguard: an inference sidecar/proxy that enforces model rollout policy.

The one top-level import name of the distribution. Its subpackages live in the
repository's top-level folders (`proxy/`, `serving/`, `policy/`), linked in here, so
that the layout stays as documented and the installed names cannot collide with other
distributions' `proxy` or `policy`.
"""

__version__ = "0.1.0"
