"""The local Exoscale's instance types: Exoscale's published families, named as the spec names them, GPU
families with their GPU counts and behind an authorization."""

from __future__ import annotations

import json

import pytest

from cloud.sim.instance_types import INSTANCE_TYPES
from cloud.sim.model import Faults, Model, ModelError
from cloud.sim.spec import spec_path


def test_families_and_sizes_are_the_specs():
    with open(spec_path()) as f:
        schema = json.load(f)["components"]["schemas"]["instance-type"]["properties"]
    families, sizes = set(schema["family"]["enum"]), set(schema["size"]["enum"])
    for family, size, cpus, memory, gpus in INSTANCE_TYPES:
        assert family in families and size in sizes, (family, size)
        assert cpus > 0 and memory > 0 and (gpus > 0) == family.startswith("gpu")
    assert {"standard", "cpu", "memory", "storage", "gpu", "gpu2", "gpu3"} <= {t[0] for t in INSTANCE_TYPES}
    assert len({(t[0], t[1]) for t in INSTANCE_TYPES}) == len(INSTANCE_TYPES)


def test_gpu_types_need_an_authorization():
    def gpu3_small(model):
        return next(t for t in model.list_instance_types() if (t.family, t.size) == ("gpu3", "small"))

    template = "Linux Ubuntu 24.04 LTS 64-bit"
    model = Model(faults=Faults(op_delay_s=0))
    t = gpu3_small(model)
    assert (t.gpus, t.authorized) == (1, False)
    tmpl = next(x.id for x in model.list_templates() if x.name == template)
    with pytest.raises(ModelError, match="authorization") as e:
        model.create_instance("g", t.id, tmpl, 100)
    assert e.value.kind == "forbidden"
    allowed = Model("de-fra-1", Faults(op_delay_s=0), authorized_families={"gpu3"})  # gpu3: de-fra-1 only
    assert gpu3_small(allowed).authorized
    allowed.create_instance("g", gpu3_small(allowed).id, tmpl, 100)
    assert [i.name for i in allowed.list_instances()] == ["g"]
