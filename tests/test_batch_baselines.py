"""Batch label-recovery baselines, each checked against its own paper's claims in its own setting (hard labels,
untrained networks, real images), and against independent computations of what it reads off the gradient."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradleak.batch.baselines import (BATCH_BASELINES, BatchBaselineResult, _impact_and_offset, _round_to_total,
                                      idlg, ilrg, llg, llg_plus, llg_star, yin)
from gradleak.client import soft_cross_entropy
from gradleak.data import load_samples
from gradleak.models import build_model, fcn


def batch_gradients(model, inputs, labels):
    """What the client uploads: the gradients of the batch's mean soft-target cross-entropy, hard labels."""
    named = dict(model.named_parameters())
    loss = soft_cross_entropy(model(inputs), F.one_hot(labels, model.num_classes).to(inputs.dtype))
    return dict(zip(named, torch.autograd.grad(loss, list(named.values()))))


def label_existence_accuracy(classes, labels, num_classes):
    """iLRG's LeAcc: the share of the C classes whose presence is called right."""
    called = torch.zeros(num_classes, dtype=torch.bool)
    called[list(classes)] = True
    return float((called == (torch.bincount(labels, minlength=num_classes) > 0)).float().mean())


def label_number_accuracy(counts, labels, num_classes):
    """iLRG's LnAcc: the share of the C classes whose count is right."""
    return float((counts == torch.bincount(labels, minlength=num_classes)).float().mean())


def matched_share(counts, labels):
    """LLG's accuracy: the share of the B predicted labels matched one-to-one with true labels."""
    return float(torch.minimum(counts, torch.bincount(labels, minlength=counts.shape[0])).sum()) / labels.numel()


@pytest.fixture(scope="module")
def mnist():
    """MNIST in [0, 1] (LLG's official code feeds ToTensor() images, unnormalised)."""
    return load_samples("mnist5000", normalize=False)


@pytest.fixture(scope="module")
def auxiliary(mnist):
    """LLG+'s auxiliary data: 1,000 MNIST images at random (the set is sorted by class), and the rest."""
    images, labels = mnist
    order = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))
    return (images[order[:1000]], labels[order[:1000]]), (images[order[1000:]], labels[order[1000:]])


@pytest.fixture(scope="module")
def lenet_mnist():
    """LLG's "CNN": the DLG LeNet (sigmoid, every parameter U(-0.5, 0.5)) with a head bias, 1x28x28 inputs."""
    return build_model("lenet", 10, head_bias=True, channels=1, image_size=28, seed=0)


def non_iid_batch(images, labels, batch_size, generator):
    """LLG's non-IID batch: half one class, a quarter another, the rest random; images drawn per class."""
    first, second = torch.randperm(10, generator=generator)[:2].tolist()
    wanted = [first] * (batch_size // 2) + [second] * (batch_size // 4)
    wanted = torch.tensor(wanted, dtype=torch.int64)
    wanted = torch.cat([wanted, torch.randint(10, (batch_size - wanted.numel(),), generator=generator)])
    pools = [torch.nonzero(labels == c).flatten() for c in range(10)]
    index = torch.stack([pools[c][torch.randint(pools[c].numel(), (1,), generator=generator)][0]
                         for c in wanted.tolist()])
    return images[index], wanted


# --------------------------------------------------------------------------------------------------------------
# iLRG
# --------------------------------------------------------------------------------------------------------------

def test_ilrg_fcn3_mnist_batch_24(mnist):
    """iLRG (Table 1 and the official README): FCN-3 (784-300-300-10, ReLU, biases, PyTorch init), untrained,
    MNIST, random batches of 24: LeAcc 1.000, LnAcc 0.994. The same table gives extended iDLG a LeAcc of 0.514
    there: it misses classes (never inventing one, with ReLU features)."""
    images, labels = mnist
    images = (images - 0.1307) / 0.3081                        # iLRG normalises MNIST
    model = fcn([784, 300, 300, 10], bias=True, init="default", generator=torch.Generator().manual_seed(0)).eval()
    generator = torch.Generator().manual_seed(1)
    leacc, lnacc, idlg_leacc = [], [], []
    for _ in range(50):                                         # the paper's num_tries
        index = torch.randperm(labels.numel(), generator=generator)[:24]
        grads = batch_gradients(model, images[index], labels[index])
        res = ilrg(model, grads, 24)
        assert int(res.counts.sum()) == 24 and len(res.labels) == 24
        leacc.append(label_existence_accuracy(res.classes, labels[index], 10))
        lnacc.append(label_number_accuracy(res.counts, labels[index], 10))
        called = idlg(model, grads, 24).classes
        assert set(called) <= set(labels[index].tolist())
        idlg_leacc.append(label_existence_accuracy(called, labels[index], 10))
    assert sum(leacc) / len(leacc) == 1.0
    assert sum(lnacc) / len(lnacc) >= 0.994
    assert sum(idlg_leacc) / len(idlg_leacc) < 1.0


@pytest.mark.parametrize("network, tries", [("lenet", 20), ("resnet18", 3)])
def test_ilrg_cnns_cifar100_batch_24(network, tries):
    """iLRG (Table 1): untrained CNNs on CIFAR-100, batches of 24: LeAcc 1.000 and LnAcc 1.000 (LeNet-5,
    ResNet-50 on ImageNet). Here the DLG LeNet and a CIFAR ResNet-18, each with a head bias; the 20 bundled
    CIFAR-100 images are drawn with replacement. We hold them to the table's lowest LnAcc at B = 24, 0.994."""
    images, labels = load_samples("cifar100")
    model = build_model(network, 100, head_bias=True, seed=0)
    generator = torch.Generator().manual_seed(0)
    leacc, lnacc = [], []
    for _ in range(tries):
        index = torch.randint(labels.numel(), (24,), generator=generator)
        res = ilrg(model, batch_gradients(model, images[index], labels[index]), 24)
        leacc.append(label_existence_accuracy(res.classes, labels[index], 100))
        lnacc.append(label_number_accuracy(res.counts, labels[index], 100))
    assert sum(leacc) / tries == 1.0
    assert sum(lnacc) / tries >= 0.994


def test_ilrg_is_exact_when_every_embedding_is_the_same():
    """iLRG's approximations (each class's embeddings and probabilities equal their means) become equalities
    when the batch is one image repeated: then any label counts, however skewed, are recovered exactly."""
    images, _ = load_samples("cifar10")
    model = build_model("lenet", 10, head_bias=True, seed=0)
    labels = torch.tensor([0] * 13 + [4] * 7 + [9] * 3 + [2], dtype=torch.int64)
    res = ilrg(model, batch_gradients(model, images[:1].expand(24, -1, -1, -1), labels), 24)
    assert torch.equal(res.counts, torch.bincount(labels, minlength=10))
    assert res.labels == tuple(sorted(labels.tolist()))
    assert res.classes == (0, 2, 4, 9)
    assert torch.allclose(res.scores, torch.bincount(labels, minlength=10).double(), atol=1e-3)


def test_ilrg_rounding_correction():
    """iLRG's rounding: clip negatives, round, drop impossible counts (> B), then move the entries rounded the
    furthest the wrong way by one until the counts sum to B."""
    def rounded(values, total):
        return _round_to_total(torch.tensor(values, dtype=torch.float64), total).tolist()

    assert rounded([2.6, 1.4, -0.3, 0.2], 4) == [3, 1, 0, 0]
    # sum 5 > 4: 2.55 -> 3 was rounded up the most (by 0.45); it goes back down
    assert rounded([2.55, 1.4, 0.7], 4) == [2, 1, 1]
    # sum 2 < 4: 1.45 and 0.4 were rounded down the most
    assert rounded([1.45, 0.4, 1.2, -2.0], 4) == [2, 1, 1, 0]
    # 9.0 > B = 4 is no count
    assert rounded([9.0, 2.2, -0.5, 2.4], 4) == [0, 2, 0, 2]
    # sum 4 > 3: the clipped -0.9 was "rounded up" the most, but a zero count never goes negative
    assert rounded([-0.9, 1.6, 1.6], 3) == [0, 1, 2]
    # off by more than one pass can fix: 0 -> 10 over 3 classes
    assert rounded([0.0, 0.0, 0.0], 10) == [4, 3, 3]


# --------------------------------------------------------------------------------------------------------------
# Yin et al. (GradInversion)
# --------------------------------------------------------------------------------------------------------------

def test_yin_restores_distinct_labels_on_resnet():
    """GradInversion (Sec. 3.2) restores the labels of a batch WITHOUT repeats from the row minima of the FC
    weight gradient (ResNet-50; iLRG's comparison measures LeAcc 1.000 for it on ResNet-50). Here an untrained
    CIFAR ResNet-18 on real CIFAR-10 images of 8 distinct classes: exact. The reason, checked directly: the head
    input is non-negative (ReLU then average pooling), so an absent class's row has no negative entry."""
    images, labels = load_samples("cifar10")
    first = {}
    for i, c in enumerate(labels.tolist()):
        first.setdefault(c, i)
    index = torch.tensor(sorted(first.values())[:8])
    model = build_model("resnet18", 10, seed=0)
    grads = batch_gradients(model, images[index], labels[index])
    res = yin(model, grads, 8)
    assert res.classes == tuple(sorted(labels[index].tolist())) == res.labels
    assert torch.equal(res.counts, torch.bincount(labels[index], minlength=10))
    minima = grads["head.weight"].double().min(dim=1).values
    assert torch.equal(res.scores, minima)
    absent = torch.bincount(labels[index], minlength=10) == 0
    assert bool((minima[absent] >= 0).all()) and bool((minima[~absent] < 0).all())


# --------------------------------------------------------------------------------------------------------------
# LLG, LLG*, LLG+
# --------------------------------------------------------------------------------------------------------------

def test_llg_batch_of_one_and_p1(auxiliary, lenet_mnist):
    """LLG (Sec. 4, P1, proved for non-negative activations): a negative row sum of the head's weight gradient
    means the class is in the batch, so every variant keeps each such class. With one example there is exactly
    one negative row: LLG then finds the label as iDLG does, whatever its impact estimate."""
    aux, (images, labels) = auxiliary
    generator = torch.Generator().manual_seed(2)
    for batch_size in (1, 1, 1, 4, 16, 64):
        x, y = non_iid_batch(images, labels, batch_size, generator)
        grads = batch_gradients(lenet_mnist, x, y)
        negative = torch.nonzero(grads["head.weight"].sum(dim=1) < 0).flatten().tolist()
        assert negative and set(negative) <= set(y.tolist())
        for res in (llg(lenet_mnist, grads, batch_size),
                    llg_star(lenet_mnist, grads, batch_size, input_shape=(1, 28, 28)),
                    llg_plus(lenet_mnist, grads, batch_size, auxiliary=aux)):
            assert int(res.counts.sum()) == batch_size and len(res.labels) == batch_size
            assert set(negative) <= set(res.classes)
            if batch_size == 1:
                assert res.labels == (int(y[0]),)


def test_llg_variants_on_untrained_lenet(auxiliary, lenet_mnist):
    """LLG's evaluation on untrained models (non-IID batches, MNIST, its CNN): knowing the model helps. LLG+
    (auxiliary data) and LLG* (dummy inputs) measure impact and offset instead of guessing them from the gradient,
    and are more accurate than LLG; LLG+ is near-perfect on untrained models."""
    aux, (images, labels) = auxiliary
    generator = torch.Generator().manual_seed(3)
    scores = {"llg": [], "llg*": [], "llg+": []}
    for batch_size in (8, 32, 128):
        for _ in range(5):
            x, y = non_iid_batch(images, labels, batch_size, generator)
            grads = batch_gradients(lenet_mnist, x, y)
            scores["llg"].append(matched_share(llg(lenet_mnist, grads, batch_size).counts, y))
            scores["llg*"].append(matched_share(
                llg_star(lenet_mnist, grads, batch_size, input_shape=(1, 28, 28)).counts, y))
            scores["llg+"].append(matched_share(llg_plus(lenet_mnist, grads, batch_size, auxiliary=aux).counts, y))
    mean = {name: sum(v) / len(v) for name, v in scores.items()}
    assert mean["llg+"] > mean["llg"] and mean["llg*"] > mean["llg"]
    assert mean["llg+"] >= 0.95


def dummy_row_sums(model, inputs, label):
    """Row sums of the head weight gradient of ``inputs`` all labelled ``label``, by autograd: (C,)."""
    grads = batch_gradients(model, inputs, torch.full((inputs.shape[0],), label, dtype=torch.int64))
    return grads["head.weight"].double().sum(dim=1)


def test_llg_star_offset_and_impact_match_autograd(lenet_mnist):
    """LLG*'s offset of class j is j's row sum in dummy batches labelled with the other classes; its impact is
    the own-class row sum, averaged, over B, times (1 + 1/C): both recomputed here from real gradients."""
    batch_size, num_classes = 6, 10
    ones = torch.ones(batch_size, 1, 28, 28)
    sums = torch.stack([dummy_row_sums(lenet_mnist, ones, i) for i in range(num_classes)])   # [i, j]
    off_diagonal = ~torch.eye(num_classes, dtype=torch.bool)
    offset = (sums * off_diagonal).sum(dim=0) / (num_classes - 1)
    impact = float(sums.diagonal().mean()) / batch_size * (1 + 1 / num_classes)

    images, labels = load_samples("mnist", normalize=False)
    grads = batch_gradients(lenet_mnist, images[:batch_size], labels[:batch_size])
    res = llg_star(lenet_mnist, grads, batch_size, input_shape=(1, 28, 28), dummy="ones", repeats=3)
    row_sums = grads["head.weight"].double().sum(dim=1)
    assert torch.allclose(row_sums - res.scores, offset, rtol=1e-4, atol=1e-9)

    with torch.no_grad():
        features = lenet_mnist.features(ones)
        probs = torch.softmax(lenet_mnist.head(features).double(), dim=1)
    features = features.double()
    got_impact, got_offset = _impact_and_offset(features.sum(dim=1), probs,
                                                torch.arange(batch_size).expand(2, num_classes, -1))
    assert got_impact == pytest.approx(impact, rel=1e-4)
    assert torch.allclose(got_offset, offset, rtol=1e-4, atol=1e-9)


def test_llg_plus_offset_matches_autograd(mnist, lenet_mnist):
    """LLG+'s simulated batch of class i holds auxiliary inputs of class i: with ONE auxiliary input per class,
    every draw is that input, and the offset is recomputed exactly from real gradients."""
    images, labels = mnist
    index = torch.searchsorted(labels, torch.arange(10))   # the first image of each class (sorted by class)
    batch_size = 5
    sums = torch.stack([dummy_row_sums(lenet_mnist, images[i].expand(batch_size, -1, -1, -1), c)
                        for c, i in enumerate(index.tolist())])
    offset = (sums * ~torch.eye(10, dtype=torch.bool)).sum(dim=0) / 9
    grads = batch_gradients(lenet_mnist, images[index[:batch_size] + 1], labels[index[:batch_size] + 1])
    res = llg_plus(lenet_mnist, grads, batch_size, auxiliary=(images[index], labels[index]), repeats=2)
    assert torch.allclose(grads["head.weight"].double().sum(dim=1) - res.scores, offset, rtol=1e-4, atol=1e-9)


def test_llg_plus_is_reproducible_and_seeded(auxiliary, lenet_mnist):
    aux, (images, labels) = auxiliary
    grads = batch_gradients(lenet_mnist, images[:16], labels[:16])
    a = llg_plus(lenet_mnist, grads, 16, auxiliary=aux, seed=5)
    b = llg_plus(lenet_mnist, grads, 16, auxiliary=aux, seed=5)
    c = llg_plus(lenet_mnist, grads, 16, auxiliary=aux, seed=6)
    assert torch.equal(a.scores, b.scores) and a.labels == b.labels
    assert not torch.equal(a.scores, c.scores)
    d = llg_star(lenet_mnist, grads, 16, input_shape=(1, 28, 28), dummy="random", seed=1)
    e = llg_star(lenet_mnist, grads, 16, input_shape=(1, 28, 28), dummy="random", seed=1)
    assert torch.equal(d.scores, e.scores)


# --------------------------------------------------------------------------------------------------------------
# iDLG, the registry, the result, error paths
# --------------------------------------------------------------------------------------------------------------

def test_idlg_is_the_set_of_negative_row_sums(auxiliary, lenet_mnist):
    _, (images, labels) = auxiliary
    grads = batch_gradients(lenet_mnist, images[:12], labels[:12])
    res = idlg(lenet_mnist, grads, 12)
    sums = grads["head.weight"].double().sum(dim=1)
    assert res.classes == tuple(torch.nonzero(sums < 0).flatten().tolist())
    assert res.counts is None and res.labels is None and res.method == "idlg"
    assert torch.equal(res.scores, sums)


def test_registry_results_and_gradient_forms(auxiliary, lenet_mnist):
    aux, (images, labels) = auxiliary
    grads = batch_gradients(lenet_mnist, images[:8], labels[:8])
    as_list = [grads[name] for name, _ in lenet_mnist.named_parameters()]
    options = {"llg*": dict(input_shape=(1, 28, 28)), "llg+": dict(auxiliary=aux)}
    assert set(BATCH_BASELINES) == {"ilrg", "llg", "llg*", "llg+", "yin", "idlg"}
    for name, fn in BATCH_BASELINES.items():
        res = fn(lenet_mnist, grads, 8, **options.get(name, {}))
        assert isinstance(res, BatchBaselineResult) and res.method == name
        assert res.scores.shape == (10,) and res.scores.dtype == torch.float64
        assert res.classes == tuple(sorted(set(res.classes)))
        if res.counts is not None:
            assert res.counts.dtype == torch.int64 and int(res.counts.sum()) == 8
            assert res.labels == tuple(sorted(res.labels)) and len(res.labels) == 8
            assert res.classes == tuple(torch.nonzero(res.counts).flatten().tolist())
        again = fn(lenet_mnist, as_list, 8, **options.get(name, {}))
        assert again.classes == res.classes and torch.equal(again.scores, res.scores)
        with pytest.raises(AttributeError):
            res.method = "other"


def test_error_paths(auxiliary, lenet_mnist):
    (aux_images, aux_labels), (images, labels) = auxiliary
    grads = batch_gradients(lenet_mnist, images[:4], labels[:4])
    bias_free = build_model("lenet", 10, channels=1, image_size=28, seed=0)
    with pytest.raises(ValueError, match="bias"):
        ilrg(bias_free, batch_gradients(bias_free, images[:4], labels[:4]), 4)
    for fn in (ilrg, llg, yin, idlg):
        with pytest.raises(ValueError, match="batch_size"):
            fn(lenet_mnist, grads, 0)
        with pytest.raises(TypeError, match="batch_size"):
            fn(lenet_mnist, grads, 2.0)
        with pytest.raises(ValueError, match="shape"):
            fn(lenet_mnist, {**grads, "head.weight": grads["head.weight"][:, :-1]}, 4)
        with pytest.raises(ValueError, match="NaN"):
            fn(lenet_mnist, {**grads, "head.weight": grads["head.weight"] * float("nan")}, 4)
    with pytest.raises(ValueError, match="shape"):
        ilrg(lenet_mnist, {**grads, "head.bias": grads["head.bias"][:-1]}, 4)
    with pytest.raises(ValueError, match="distinct"):
        yin(lenet_mnist, grads, 11)
    with pytest.raises(ValueError, match="input_shape"):
        llg_star(lenet_mnist, grads, 4)
    with pytest.raises(ValueError, match="dummy"):
        llg_star(lenet_mnist, grads, 4, input_shape=(1, 28, 28), dummy="noise")
    with pytest.raises(ValueError, match="auxiliary"):
        llg_plus(lenet_mnist, grads, 4)
    with pytest.raises(ValueError, match=r"classes \[9\]"):
        llg_plus(lenet_mnist, grads, 4, auxiliary=(aux_images[aux_labels != 9], aux_labels[aux_labels != 9]))
    with pytest.raises(ValueError, match="int64"):
        llg_plus(lenet_mnist, grads, 4, auxiliary=(aux_images, aux_labels.float()))
