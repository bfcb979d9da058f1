"""The family registry and specs: every line resolves, every spec keeps its promises, and a new
family needs one module and one registry line to reach the command line."""

from __future__ import annotations

import sys
import textwrap

import pytest

from samedge.cli.commands import _model_options
from samedge.cli.parser import build_parser
from samedge.errors import SamedgeError
from samedge.models import registry
from samedge.models.family import Family


@pytest.mark.parametrize("name", registry.FAMILY_NAMES)
def test_every_spec_keeps_its_promises(name):
    from samedge.export.exporter import DECODER_EXPORTS

    spec = registry.family(name)
    assert isinstance(spec, Family) and spec.name == name
    accepted = spec.accepted()
    assert {o.name for o in spec.options} <= set(accepted), "an option the builder does not take"
    assert spec.decoder_graph in DECODER_EXPORTS
    assert spec.merge is None or callable(spec.merge)


def test_unknown_family_is_a_typed_error():
    with pytest.raises(SamedgeError, match="unknown family 'nope'"):
        registry.family("nope")


def test_rebuild_options_read_the_manifest_record():
    spec = registry.family("masam")
    model = {"family": "masam", "image_size": 128, "depth": 5, "variant": "vit_b",
             "checkpoint": {"path": "/x/epoch_159.pth", "base": "/x/sam.pth", "scale": 0.5}}
    assert spec.rebuild_options(model) == {"checkpoint": "/x/epoch_159.pth", "base": "/x/sam.pth",
                                           "image_size": 128, "depth": 5, "scale": 0.5}


def test_a_new_family_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    (tmp_path / "toy_family.py").write_text(textwrap.dedent('''
        from samedge.models.family import CHECKPOINT, Family, Option

        def build_toy(checkpoint=None, widget: int = 3):
            return ("toy", checkpoint, widget)

        FAMILY = Family(name="toy", summary="a toy", build=build_toy,
                        options=(CHECKPOINT, Option("widget", "how many widgets", int)))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    specs = {**registry.FAMILY_SPECS, "toy": "toy_family:FAMILY"}
    monkeypatch.setattr(registry, "FAMILY_SPECS", specs)
    monkeypatch.setattr(registry, "FAMILY_NAMES", tuple(specs))
    monkeypatch.setattr("samedge.cli.parser.FAMILY_NAMES", tuple(specs))
    parser = build_parser(registry.all_options())
    args = parser.parse_args(["export", "--family", "toy", "--widget", "5"])
    options = _model_options(args)
    assert options == {"widget": 5}
    assert registry.build_model("toy", **options) == ("toy", None, 5)
    with pytest.raises(SamedgeError, match="does not take depth"):
        registry.build_model("toy", depth=3)
    sys.modules.pop("toy_family", None)
