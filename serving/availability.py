"""Whether a registry version can take traffic: the one answer routing asks the registry.

`Registry.availability(model, version)` returns one of these. Routing sends a rollout's
candidate traffic only when it is `READY`; anything else fails the candidate's share
over to the stable. A stable that is `STALE` keeps serving its last verified load.
"""

from __future__ import annotations

import enum


class Availability(enum.Enum):
    READY = "ready"  # verified, loaded and (for upstreams) answering its ready probe
    STALE = "stale"  # serving its last verified load; newer files on disk were refused
    LOADING = "loading"  # seen, not yet loaded (a copy settling, a load or retry pending)
    UNREADY = "unready"  # loaded, but its upstream's ready probe or outlier detection says no
    REFUSED = "refused"  # nothing verified to serve: bad manifest, hash or load
    MISSING = "missing"  # no such version directory

    @property
    def serves(self) -> bool:
        """A load exists that can answer a request."""
        return self in (Availability.READY, Availability.STALE)
