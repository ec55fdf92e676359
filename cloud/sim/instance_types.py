"""The instance types the local Exoscale offers: Exoscale's published families and sizes.

Source: Exoscale's pricing page (https://www.exoscale.com/pricing/), as transcribed in coder/modules
`exoscale-instance-type/main.tf` (commit 03c9df6), read 2026-11-29; family and size names checked against
the enums of Exoscale's OpenAPI spec (tests/test_sim_types.py). Prices are not modelled here (see
cloud.pricing). GPU families need Exoscale's authorization (`authorized` false for a new account; a Model
can be given authorized families). The spec also names GPU families this table lacks (gpu3080ti, gpua30,
gpua5000, gpurtx6000pro, gpub300): their sizes are not published there.

Zones (FAMILY_ZONES): the zone names are the spec's `zone-name` enum. The CPU families are offered in every
zone. For the GPU families Exoscale publishes no compute availability table; the one statement found is in
its Dedicated Inference documentation ("Limits and Quotas", community.exoscale.com, read 2026-12-06), whose
`exo dedicated-inference deployment instance-type` example lists gpu3 in de-fra-1, gpua5000 and gpu3080ti
in at-vie-2, gpurtx6000pro in ch-dk-2, de-fra-1 and hr-zag-1. gpu3 in de-fra-1 is taken from there. The
older gpu and gpu2 families are not listed anywhere found: ch-gva-2 (and at-vie-1 for gpu2) is an
assumption of this emulator, not a documented fact.
"""

from __future__ import annotations

GiB = 1024**3
MiB = 1024**2

# (family, size, cpus, memory in bytes, gpus)
INSTANCE_TYPES: tuple[tuple[str, str, int, int, int], ...] = (
    ("standard", "micro", 1, 512 * MiB, 0),
    ("standard", "tiny", 1, 1 * GiB, 0),
    ("standard", "small", 2, 2 * GiB, 0),
    ("standard", "medium", 2, 4 * GiB, 0),
    ("standard", "large", 4, 8 * GiB, 0),
    ("standard", "extra-large", 4, 16 * GiB, 0),
    ("standard", "huge", 8, 32 * GiB, 0),
    ("standard", "mega", 12, 64 * GiB, 0),
    ("standard", "titan", 16, 128 * GiB, 0),
    ("standard", "jumbo", 24, 256 * GiB, 0),
    ("standard", "colossus", 40, 320 * GiB, 0),
    ("cpu", "extra-large", 8, 16 * GiB, 0),
    ("cpu", "huge", 16, 32 * GiB, 0),
    ("cpu", "mega", 32, 64 * GiB, 0),
    ("cpu", "titan", 40, 128 * GiB, 0),
    ("memory", "extra-large", 2, 16 * GiB, 0),
    ("memory", "huge", 4, 32 * GiB, 0),
    ("memory", "mega", 8, 64 * GiB, 0),
    ("memory", "titan", 12, 128 * GiB, 0),
    ("storage", "extra-large", 4, 16 * GiB, 0),
    ("storage", "huge", 8, 32 * GiB, 0),
    ("storage", "mega", 12, 64 * GiB, 0),
    ("storage", "titan", 16, 128 * GiB, 0),
    ("storage", "jumbo", 24, 225 * GiB, 0),
    ("gpu", "small", 12, 56 * GiB, 1),
    ("gpu", "medium", 16, 90 * GiB, 2),
    ("gpu", "large", 24, 120 * GiB, 3),
    ("gpu", "huge", 48, 225 * GiB, 4),
    ("gpu2", "small", 12, 56 * GiB, 1),
    ("gpu2", "medium", 16, 90 * GiB, 2),
    ("gpu2", "large", 24, 120 * GiB, 3),
    ("gpu2", "huge", 48, 225 * GiB, 4),
    ("gpu3", "small", 12, 56 * GiB, 1),
    ("gpu3", "medium", 24, 120 * GiB, 2),
    ("gpu3", "large", 48, 224 * GiB, 4),
    ("gpu3", "huge", 96, 448 * GiB, 8),
)

ALL_ZONES = ("at-vie-1", "at-vie-2", "bg-sof-1", "ch-dk-2", "ch-gva-2", "de-fra-1", "de-muc-1", "hr-zag-1")

# The zones offering each family (see the module's docstring for what is documented and what is assumed).
FAMILY_ZONES: dict[str, tuple[str, ...]] = {
    "standard": ALL_ZONES,
    "cpu": ALL_ZONES,
    "memory": ALL_ZONES,
    "storage": ALL_ZONES,
    "gpu": ("ch-gva-2",),  # assumed
    "gpu2": ("at-vie-1", "ch-gva-2"),  # assumed
    "gpu3": ("de-fra-1",),  # Exoscale's Dedicated Inference documentation
}

# Families a new account may use without asking Exoscale (the GPU families need an authorization).
AUTHORIZED_FAMILIES = frozenset({"standard", "cpu", "memory", "storage"})
