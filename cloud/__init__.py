"""Where the sweep runs: Exoscale VMs (API v2 through libcloud), SSH to them, Ray started on them.

Importing this package registers the libcloud provider "exoscale_v2".
"""

from libcloud.compute.providers import get_driver, set_driver

PROVIDER = "exoscale_v2"


def _register() -> None:
    try:
        get_driver(PROVIDER)
    except AttributeError:
        # libcloud documents module and class as dotted names and uses them so (common/providers.py);
        # its type comment says a module object and a class, which it never receives from its own callers
        set_driver(PROVIDER, "cloud.exoscale_driver", "ExoscaleV2NodeDriver")  # type: ignore[arg-type]


_register()
