"""FMRLRec: every nested size is a standalone model, the item table is tied to the input embedding, feature
tables are validated, parameter counts follow the config, and initialisation is seeded. The variants cover
every item-tower input: frozen text and image features, the learnable ID table and the learnable
attribute table (mean-pooled attribute bags)."""

from __future__ import annotations

import re

import pytest
import torch

from models.fmrl import AttributeBags, FMRLConfig, FMRLRec
from models.fmrl.layers import NestedLinear
from models.ops import nested_mask

NUM_ITEMS = 23
TEXT_DIM, IMAGE_DIM = 12, 7
SIZES = [4, 8, 16, 32]

VARIANTS = {
    "text+image": dict(use_text_features=True, use_image_features=True, use_id_embedding=False),
    "text": dict(use_text_features=True, use_image_features=False, use_id_embedding=False),
    "image": dict(use_text_features=False, use_image_features=True, use_id_embedding=False),
    "image+id": dict(use_text_features=False, use_image_features=True, use_id_embedding=True),
    "id+attributes": dict(
        use_text_features=False, use_image_features=False, use_id_embedding=True, use_attributes=True
    ),
    "text+attributes": dict(
        use_text_features=True, use_image_features=False, use_id_embedding=False, use_attributes=True
    ),
}
NUM_ATTRIBUTES = 9


def _attribute_bags() -> AttributeBags:
    """0-4 attributes per item (items 3 and 7 have none), ids in 1..NUM_ATTRIBUTES; row 0 has none."""
    g = torch.Generator().manual_seed(4)
    lengths = torch.randint(0, 5, (NUM_ITEMS + 1,), generator=g)
    lengths[[0, 3, 7]] = 0
    offsets = torch.zeros(NUM_ITEMS + 2, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    values = torch.randint(1, NUM_ATTRIBUTES + 1, (int(offsets[-1]),), generator=g)
    return AttributeBags(offsets, values, NUM_ATTRIBUTES)


def _features(width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(NUM_ITEMS + 1, width, generator=g)
    table[0] = 0.0
    return table


def _build(variant: str, seed: int = 0, dropout: float = 0.1, sizes=SIZES, num_blocks: int = 2) -> FMRLRec:
    cfg = FMRLConfig(
        nested_sizes=list(sizes),
        num_blocks=num_blocks,
        dropout=dropout,
        attn_dropout=dropout,
        r_min=0.3,
        r_max=0.9,
        **VARIANTS[variant],
    )
    torch.manual_seed(seed)
    return FMRLRec(
        cfg,
        NUM_ITEMS,
        text_features=_features(TEXT_DIM, 1),
        image_features=_features(IMAGE_DIM, 2),
        attribute_bags=_attribute_bags(),
    )


def _randomise_norms(model: FMRLRec) -> None:
    """Give layer norms non-trivial gains and biases, so that slicing them is actually exercised."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_()


def _tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, NUM_ITEMS + 1, (4, 9), generator=g)
    tokens[1, :3] = 0  # left padding
    tokens[2, :8] = 0  # a single real item
    tokens[3, :] = 0  # all padding
    return tokens


@pytest.mark.parametrize("variant", VARIANTS)
def test_nested_submodel_matches_prefix_of_full_model(variant) -> None:
    model = _build(variant)
    _randomise_norms(model)
    model.eval()
    tokens = _tokens()
    with torch.no_grad():
        hidden, items = model(tokens)
    assert hidden.shape == (4, 9, SIZES[-1]) and items.shape == (NUM_ITEMS + 1, SIZES[-1])
    for m in SIZES:
        sub = model.nested_submodel(m).eval()
        assert sub.cfg.dim == m and sub.cfg.nested_sizes == SIZES[: SIZES.index(m) + 1]
        with torch.no_grad():
            sub_hidden, sub_items = sub(tokens)
        assert sub_hidden.shape == (4, 9, m) and sub_items.shape == (NUM_ITEMS + 1, m)
        torch.testing.assert_close(sub_items, items[:, :m], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sub_hidden, hidden[..., :m], rtol=1e-5, atol=1e-5)
        # the submodel is a genuinely smaller model
        assert sub.num_parameters() < model.num_parameters() or m == SIZES[-1]


def _perturb_beyond(model: FMRLRec, m: int) -> None:
    """Add noise to every trainable entry that a size-m model does not contain (in the dense layout)."""
    dim = model.cfg.dim
    state = model.state_dict()
    nested = {f"{name}.weight": mod for name, mod in model.named_modules() if isinstance(mod, NestedLinear)}
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    for key, value in state.items():
        if key in frozen or key.startswith(("item_tower.id_embedding.", "item_tower.attributes.")):
            continue  # ID and attribute columns are projector inputs: all of them feed every output dimension
        noise = torch.randn_like(value)
        if key in nested:
            keep = torch.zeros_like(value, dtype=torch.bool)
            keep[:m, :m] = True
            value.add_(noise * nested_mask(nested[key].sizes) * (~keep))  # stay block lower-triangular
        elif key == "item_tower.projector.weight":
            value[m:] += noise[m:]
        else:
            assert value.dim() == 1 and value.shape[0] == dim, key
            value[m:] += noise[m:]
    model.load_state_dict(state)


@pytest.mark.parametrize("variant", ["text+image", "image+id", "id+attributes"])
def test_prefix_ignores_parameters_beyond_it(variant) -> None:
    model = _build(variant).eval()
    _randomise_norms(model)
    tokens = _tokens()
    with torch.no_grad():
        hidden, items = model(tokens)
    for m in SIZES[:-1]:
        perturbed = _build(variant).eval()
        perturbed.load_state_dict(model.state_dict())
        _perturb_beyond(perturbed, m)
        with torch.no_grad():
            hidden2, items2 = perturbed(tokens)
        torch.testing.assert_close(items2[:, :m], items[:, :m], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(hidden2[..., :m], hidden[..., :m], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(hidden2[..., m:], hidden[..., m:], atol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_input_embedding_is_tied_to_item_table(variant) -> None:
    model = _build(variant, dropout=0.0)
    tokens = _tokens()
    tower = model.item_tower
    # the item table by hand: projector over the concatenated tables in order text, image, id, attributes,
    # an item's attribute row being the mean of its bag's rows (zeros for an empty bag)
    tables = [t.weight for t in (tower.text, tower.image, tower.id_embedding) if t is not None]
    if tower.attributes is not None:
        bags = _attribute_bags()
        pooled = torch.zeros(NUM_ITEMS + 1, tower.attributes.embedding_dim)
        for item in range(NUM_ITEMS + 1):
            bag = bags.values[bags.offsets[item] : bags.offsets[item + 1]]
            if len(bag):
                pooled[item] = tower.attributes.weight[bag].mean(0)
        tables.append(pooled)
    by_hand = torch.cat(tables, dim=1) @ tower.projector.weight.T + tower.projector.bias
    with torch.no_grad():
        hidden, items = model(tokens)
        torch.testing.assert_close(items, by_hand, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden, model.trunk(tower()[tokens], tokens > 0), rtol=0, atol=0)
        # an item table passed in is the one embedded (evaluation reuses it)
        other = torch.randn_like(items)
        hidden_other, returned = model(tokens, other)
        assert returned is other
        torch.testing.assert_close(hidden_other, model.trunk(other[tokens], tokens > 0), rtol=0, atol=0)
        assert not torch.allclose(hidden_other, hidden)


def test_attribute_bags_select_matches_a_loop() -> None:
    bags = _attribute_bags()
    ids = torch.tensor([5, 0, 3, 5, NUM_ITEMS, 1])
    values, lengths = bags.select(ids)
    expected = [bags.values[bags.offsets[i] : bags.offsets[i + 1]] for i in ids.tolist()]
    assert lengths.tolist() == [len(e) for e in expected]
    assert values.tolist() == torch.cat(expected).tolist()
    # the tower's lookup (the distributed path's shape) equals the whole-table forward
    model = _build("id+attributes", dropout=0.0)
    with torch.no_grad():
        torch.testing.assert_close(
            model.item_tower.project(model.item_tower.lookup(ids)),
            model.item_tower()[ids],
            rtol=1e-6,
            atol=1e-6,
        )


def test_attribute_table_needs_bags_of_every_item() -> None:
    cfg = FMRLConfig(nested_sizes=[4, 8], num_blocks=1, use_text_features=False, use_attributes=True)
    with pytest.raises(ValueError, match="attribute bags"):
        FMRLRec(cfg, NUM_ITEMS)
    short = AttributeBags(torch.zeros(NUM_ITEMS, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match=re.escape(f"({NUM_ITEMS + 2},)")):
        FMRLRec(cfg, NUM_ITEMS, attribute_bags=short)


def test_item_table_gradient_reaches_tower_through_input_and_output() -> None:
    model = _build("image+id", dropout=0.0)
    tokens = _tokens()
    hidden, items = model(tokens)
    # a loss on the hidden states alone reaches the tower only through the input embedding; padded
    # positions are never scored, so the loss reads the real positions only
    hidden[tokens > 0].sum().backward()
    assert model.item_tower.projector.weight.grad.abs().sum() > 0
    id_grad = model.item_tower.id_embedding.weight.grad
    used = torch.zeros(NUM_ITEMS + 1, dtype=torch.bool)
    used[tokens[tokens > 0]] = True
    assert torch.all(id_grad[used].abs().sum(1) > 0)
    assert torch.all(id_grad[~used] == 0)  # unused items and the pad row 0 get nothing
    assert not used[0]


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(text_features=torch.zeros(NUM_ITEMS, TEXT_DIM)), (NUM_ITEMS, TEXT_DIM)),
        (dict(text_features=torch.zeros(NUM_ITEMS + 2, TEXT_DIM)), (NUM_ITEMS + 2, TEXT_DIM)),
        (dict(image_features=torch.zeros(NUM_ITEMS + 1)), (NUM_ITEMS + 1,)),
        (dict(image_features=torch.zeros(2, NUM_ITEMS + 1, 3)), (2, NUM_ITEMS + 1, 3)),
    ],
    ids=["text-no-pad-row", "text-extra-row", "image-1d", "image-3d"],
)
def test_wrong_feature_table_shape_raises(kwargs, shape) -> None:
    cfg = FMRLConfig(nested_sizes=[4, 8], num_blocks=1)
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        FMRLRec(cfg, NUM_ITEMS, **kwargs)


def test_no_item_inputs_raises() -> None:
    cfg = FMRLConfig(nested_sizes=[4, 8], num_blocks=1, use_id_embedding=False)
    with pytest.raises(ValueError, match="at least one"):
        FMRLRec(cfg, NUM_ITEMS)


@pytest.mark.parametrize("size", [0, 5, 12, 64])
def test_nested_submodel_rejects_unknown_size(size) -> None:
    model = _build("text")
    with pytest.raises(ValueError, match=f"size {size} is not one of"):
        model.nested_submodel(size)


def _triangle(sizes) -> int:
    """Free entries of a block lower-triangular D x D weight: block i is (m_i - m_{i-1}) x m_i."""
    return sum(end * (end - start) for start, end in zip([0, *sizes[:-1]], sizes))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sizes, num_blocks", [(SIZES, 2), ([8, 16, 32, 64, 128], 1), ([6], 3)], ids=str)
def test_num_parameters_matches_formula(variant, sizes, num_blocks) -> None:
    model = _build(variant, sizes=sizes, num_blocks=num_blocks)
    flags = VARIANTS[variant]
    dim = sizes[-1]
    feature_width = TEXT_DIM * flags["use_text_features"] + IMAGE_DIM * flags["use_image_features"]
    id_width = dim if flags["use_id_embedding"] else 0
    attribute_width = dim if flags.get("use_attributes") else 0
    projector = (feature_width + id_width + attribute_width + 1) * dim
    id_table = (NUM_ITEMS + 1) * id_width + (NUM_ATTRIBUTES + 1) * attribute_width
    nested_with_bias = _triangle(sizes) + dim
    nested_without_bias = _triangle(sizes)
    # per block: in_re, in_im, out_re, gate, up, down with bias; out_im without; nu, theta, gamma; 2 norms
    block = 6 * nested_with_bias + nested_without_bias + 3 * dim + 2 * (2 * dim)
    expected = projector + id_table + num_blocks * block
    assert model.num_parameters() == expected
    frozen = (NUM_ITEMS + 1) * feature_width
    assert model.num_parameters(trainable_only=False) == expected + frozen


def test_frozen_feature_tables_are_frozen_and_unchanged() -> None:
    model = _build("text+image")
    assert not model.item_tower.text.weight.requires_grad
    assert not model.item_tower.image.weight.requires_grad
    torch.testing.assert_close(model.item_tower.text.weight, _features(TEXT_DIM, 1), rtol=0, atol=0)
    torch.testing.assert_close(model.item_tower.image.weight, _features(IMAGE_DIM, 2), rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["text+image", "image+id", "id+attributes"])
def test_same_seed_same_init(variant) -> None:
    a, b, c = _build(variant, seed=5), _build(variant, seed=5), _build(variant, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    frozen = {n for n, p in a.named_parameters() if not p.requires_grad}
    # norms start at 1 and 0; the imaginary parts of the LRU's B and C start at 0 ("real" complex init)
    trainable = {k for k in sa if k not in frozen and "norm" not in k and "_im." not in k}
    assert trainable
    assert all(not sa[k].any() for k in sa if "_im." in k)
    assert all(not torch.equal(sa[k], sc[k]) for k in trainable), "a different seed must change the init"
