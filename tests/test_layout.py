"""Layout: packing, fingerprints, serialisation, flat vectors, and layouts of torch modules."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from paramserver.layout import ALIGN, Layout

# Odd sizes and mixed item sizes, so that almost every array is followed by padding.
MIXED_SPECS = {
    "a": ((3,), np.float32),
    "b": ((2, 5), np.float64),
    "c": ((7,), np.int8),
    "d": ((0,), np.float32),
    "e": ((1, 1, 3), np.float16),
    "f": ((16,), np.int64),
    "g": ((), np.uint16),
}

# One dtype (a model layout), sizes chosen so that the gaps between arrays are non-empty.
MODEL_SPECS = {
    "w1": ((3, 5), np.float32),
    "b1": ((5,), np.float32),
    "w2": ((5, 2), np.float32),
    "b2": ((2,), np.float32),
}


def _random_arrays(layout: Layout, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f.name: rng.standard_normal(f.shape).astype(f.dtype) for f in layout}


# -- packing -------------------------------------------------------------------------


def test_pack_aligns_every_offset_and_keeps_arrays_apart():
    layout = Layout.pack(MIXED_SPECS)

    assert layout.names == list(MIXED_SPECS)
    for f in layout:
        assert f.offset % ALIGN == 0, f"{f.name} at {f.offset}"
    assert layout.nbytes % ALIGN == 0
    ends = [f.offset + f.nbytes for f in layout]
    starts = [f.offset for f in layout]
    assert starts[0] == 0
    for end, next_start in zip(ends, starts[1:], strict=False):
        assert end <= next_start
    assert ends[-1] <= layout.nbytes


def test_pack_records_shapes_and_dtypes():
    layout = Layout.pack(MIXED_SPECS)

    for name, (shape, dtype) in MIXED_SPECS.items():
        f = layout[name]
        assert f.shape == shape
        assert np.dtype(f.dtype) == np.dtype(dtype)
        assert f.size == int(np.prod(shape))
        assert f.nbytes == f.size * np.dtype(dtype).itemsize


def test_pack_of_a_64_byte_multiple_wastes_no_space():
    layout = Layout.pack({"a": ((16,), np.float32), "b": ((8,), np.float64)})

    assert [f.offset for f in layout] == [0, 64]
    assert layout.nbytes == 128


def test_unknown_name_raises_key_error_listing_names():
    layout = Layout.pack(MODEL_SPECS)

    with pytest.raises(KeyError, match="no array named 'nope'.*w1"):
        layout["nope"]


@pytest.mark.parametrize("dtype", [object, np.complex64, "U3"])
def test_pack_rejects_non_numeric_dtype(dtype):
    with pytest.raises(TypeError, match=r"only numeric dtypes.*astype\(np.float32\)"):
        Layout.pack({"bad": ((3,), dtype)})


def test_pack_rejects_negative_dimension():
    with pytest.raises(ValueError, match="negative dimension"):
        Layout.pack({"x": ((3, -1), np.float32)})


def test_pack_rejects_empty_name():
    with pytest.raises(TypeError, match="non-empty strings"):
        Layout.pack({"": ((3,), np.float32)})


# -- fingerprints ----------------------------------------------------------------------


def test_fingerprint_equal_for_equal_layouts():
    a = Layout.pack(MIXED_SPECS)
    b = Layout.pack(dict(MIXED_SPECS))

    assert a is not b
    assert a == b
    assert a.fingerprint == b.fingerprint
    assert len(a.fingerprint) == 32


def test_fingerprint_equal_for_from_arrays_and_pack():
    arrays = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}

    assert (
        Layout.from_arrays(arrays).fingerprint
        == Layout.pack({"w": ((4, 3), np.float32), "b": ((3,), np.float32)}).fingerprint
    )


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"w1": None, "W1": ((3, 5), np.float32)}, id="name"),
        pytest.param({"w1": ((5, 3), np.float32)}, id="shape-transposed"),
        pytest.param({"b1": ((6,), np.float32)}, id="shape-size"),
        pytest.param({"b2": ((2,), np.float64)}, id="dtype"),
        pytest.param({"b2": ((2,), np.int32)}, id="dtype-same-itemsize"),
    ],
)
def test_fingerprint_changes_with_name_shape_or_dtype(change):
    specs = dict(MODEL_SPECS)
    for name, spec in change.items():
        if spec is None:
            del specs[name]
        else:
            specs[name] = spec
    base = Layout.pack(MODEL_SPECS)
    changed = Layout.pack(specs)

    assert changed.fingerprint != base.fingerprint


def test_fingerprint_changes_with_order():
    reordered = dict(reversed(list(MODEL_SPECS.items())))

    assert Layout.pack(reordered).fingerprint != Layout.pack(MODEL_SPECS).fingerprint


# -- serialisation ---------------------------------------------------------------------


def test_to_dict_from_dict_round_trip():
    layout = Layout.pack(MIXED_SPECS)

    back = Layout.from_dict(layout.to_dict())

    assert back == layout
    assert back.fingerprint == layout.fingerprint


def test_round_trip_through_json_text():
    layout = Layout.pack(MIXED_SPECS)

    back = Layout.from_dict(json.loads(layout.to_json()))

    assert back == layout
    assert back.fingerprint == layout.fingerprint


def test_from_dict_rejects_an_unknown_dtype_string():
    d = Layout.pack(MODEL_SPECS).to_dict()
    d["fields"][0][3] = "not-a-dtype"

    with pytest.raises(TypeError):
        Layout.from_dict(d)


@pytest.mark.parametrize("dtype", ["|O", "<c8"])
def test_from_dict_rejects_dtypes_that_pack_rejects(dtype):
    d = Layout.pack(MODEL_SPECS).to_dict()
    d["fields"][0][3] = dtype

    with pytest.raises(TypeError):
        Layout.from_dict(d)


# -- flat vectors ------------------------------------------------------------------------


def test_flatten_unflatten_round_trip_and_padding_stays_zero():
    layout = Layout.pack(MODEL_SPECS)
    arrays = _random_arrays(layout)

    flat = layout.flatten(arrays)

    assert flat.dtype == np.float32
    assert flat.shape == (layout.flat_size,)
    assert layout.flat_size * 4 == layout.nbytes
    assert layout.num_params == sum(a.size for a in arrays.values())
    assert layout.flat_size > layout.num_params  # the specs do leave gaps
    back = layout.unflatten(flat)
    assert list(back) == layout.names
    for name, a in arrays.items():
        np.testing.assert_array_equal(back[name], a)
    padding = np.ones(layout.flat_size, dtype=bool)
    for f in layout:
        padding[f.offset // 4 : f.offset // 4 + f.size] = False
    assert padding.sum() == layout.flat_size - layout.num_params
    assert np.all(flat[padding] == 0)


def test_unflatten_gives_views_into_the_flat_vector():
    layout = Layout.pack(MODEL_SPECS)
    flat = np.zeros(layout.flat_size, np.float32)

    views = layout.unflatten(flat)
    views["b1"][...] = 7.0
    views["w2"][1, 1] = -3.0

    f = layout["b1"]
    np.testing.assert_array_equal(flat[f.offset // 4 : f.offset // 4 + 5], np.full(5, 7.0, np.float32))
    assert flat[layout["w2"].offset // 4 + 3] == -3.0
    assert np.count_nonzero(flat) == 6


def test_flatten_into_given_out():
    layout = Layout.pack(MODEL_SPECS)
    arrays = _random_arrays(layout, seed=1)
    out = np.zeros(layout.flat_size, np.float32)

    result = layout.flatten(arrays, out=out)

    assert result is out
    np.testing.assert_array_equal(out, layout.flatten(arrays))


def test_flatten_missing_array_raises_key_error():
    layout = Layout.pack(MODEL_SPECS)
    arrays = _random_arrays(layout)
    del arrays["b2"]

    with pytest.raises(KeyError, match="b2"):
        layout.flatten(arrays)


def test_flatten_wrong_shape_raises_value_error():
    layout = Layout.pack(MODEL_SPECS)
    arrays = _random_arrays(layout)
    arrays["w1"] = arrays["w1"].T

    with pytest.raises(ValueError, match=r"'w1' has shape \(5, 3\), layout says \(3, 5\)"):
        layout.flatten(arrays)


def test_dtype_of_mixed_layout_raises_value_error_naming_the_fix():
    layout = Layout.pack({"w": ((3,), np.float32), "b": ((3,), np.float64)})

    with pytest.raises(ValueError, match=r"one dtype.*cast the model first \(e\.g\. model\.float\(\)\)"):
        _ = layout.dtype


def test_dtype_of_single_dtype_layout():
    assert Layout.pack(MODEL_SPECS).dtype == np.dtype(np.float32)


# -- torch modules -------------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, kernel_size=3)
        self.bn = torch.nn.BatchNorm2d(3)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.weight.requires_grad_(False)
        self.head = torch.nn.Linear(12, 5)


def test_from_torch_follows_named_parameters_and_skips_buffers_and_frozen():
    torch.manual_seed(0)
    net = _Net()

    layout = Layout.from_torch(net)

    expected = [n for n, p in net.named_parameters() if p.requires_grad]
    assert layout.names == expected
    assert layout.names == [
        "conv.weight",
        "conv.bias",
        "bn.weight",
        "bn.bias",
        "frozen.bias",
        "head.weight",
        "head.bias",
    ]
    buffers = [n for n, _ in net.named_buffers()]
    assert "bn.running_mean" in buffers
    assert not set(buffers) & set(layout.names)
    assert "frozen.weight" not in layout.names
    params = dict(net.named_parameters())
    for f in layout:
        assert f.shape == tuple(params[f.name].shape)
    assert layout.dtype == np.dtype(np.float32)
    assert layout.num_params == sum(p.numel() for p in net.parameters() if p.requires_grad)


def test_from_torch_round_trips_parameter_values_through_flat_vector():
    torch.manual_seed(0)
    net = _Net()
    layout = Layout.from_torch(net)
    values = {n: p.detach().numpy() for n, p in net.named_parameters() if p.requires_grad}

    flat = layout.flatten(values)

    for name, view in layout.unflatten(flat).items():
        np.testing.assert_array_equal(view, values[name])


def test_from_torch_double_model_has_float64_layout():
    layout = Layout.from_torch(torch.nn.Linear(3, 2).double())

    assert layout.dtype == np.dtype(np.float64)
    assert layout.fingerprint != Layout.from_torch(torch.nn.Linear(3, 2)).fingerprint


def test_from_torch_without_trainable_parameters_raises():
    net = torch.nn.Linear(2, 2)
    net.requires_grad_(False)

    with pytest.raises(ValueError, match="no trainable parameters"):
        Layout.from_torch(net)


def test_dense_ranges_skip_tables_and_padding_next_to_them():
    layout = Layout.pack(
        {"emb": ((1000, 32), np.float32), "w": ((32, 2), np.float32), "b": ((2,), np.float32),
         "t2": ((10, 3), np.float32), "c": ((3,), np.float32)}
    )  # fmt: skip
    off = {f.name: f.offset // 4 for f in layout.fields}
    # w and b with the padding between them are one range; c alone; no range of padding.
    assert layout.ranges_without(["emb", "t2"]) == [(off["w"], off["b"] + 2), (off["c"], off["c"] + 3)]
    tables_only = Layout.pack({"U": ((5000, 9), np.float32), "V": ((5000, 9), np.float32)})
    assert tables_only.flat_size > 2 * 45000  # padding between and after the tables
    assert tables_only.ranges_without(["U", "V"]) == []  # nothing dense to check or update
    assert layout.ranges_without([]) == [(0, off["c"] + 3)]
