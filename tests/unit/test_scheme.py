import pytest

from quantkit.errors import SchemeError, UnknownNameError
from quantkit.scheme import PRESETS, QuantScheme, make_scheme


def test_presets_are_valid_schemes():
    for name, fields in PRESETS.items():
        s = make_scheme(name)
        assert s.bits == fields["bits"] and s.group_size == fields["group_size"]


def test_overrides_win_over_preset_and_none_is_ignored():
    s = make_scheme("w4g64", bits=3, sym=None)
    assert (s.bits, s.group_size, s.sym) == (3, 64, False)


@pytest.mark.parametrize("fields,needle", [
    ({"bits": 5}, "bits"),
    ({"group_size": 0}, "group_size"),
    ({"group_size": 48}, "multiple of 32"),
    ({"colour": "red"}, "colour"),
])
def test_bad_fields_are_one_line(fields, needle):
    with pytest.raises(SchemeError) as e:
        make_scheme(None, **fields)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="w4g64"):
        make_scheme("w5g7")


def test_group_size_must_divide_in_features_with_hint():
    s = QuantScheme(bits=4, group_size=128)
    shapes = {"model.layers.0.self_attn.q_proj": (576, 576), "model.layers.0.mlp.down_proj": (576, 1536)}
    with pytest.raises(SchemeError) as e:
        s.check_layers(shapes)
    assert str(e.value) == ("group_size 128 does not divide in_features 576 of model.layers.0.self_attn.q_proj; "
                            "use 64, 32 or -1")
    QuantScheme(bits=4, group_size=64).check_layers(shapes)


def test_skip_patterns():
    s = QuantScheme()
    assert s.skips("lm_head") and s.skips("model.embed_tokens")
    assert not s.skips("model.layers.0.mlp.down_proj")
    assert QuantScheme(skip=("*.mlp.down_proj",)).skips("model.layers.3.mlp.down_proj")


def test_scheme_is_frozen_and_forbids_extra():
    s = QuantScheme()
    with pytest.raises(Exception):
        s.bits = 8
    with pytest.raises(Exception):
        QuantScheme(foo=1)
