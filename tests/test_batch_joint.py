"""gradleak.batch.joint: a batch of up to C - 1 examples solved as one system from its counts, checked against the
truth the test alone knows (the batch's labels and head inputs)."""
import copy

import pytest
import torch

import gradleak
from gradleak.batch.joint import JointSystem, solve_jointly
from gradleak.batch.mass import fit_lattice
from gradleak.batch.split import split_batch
from victims import batch_gradients, paired

PRECISION = torch.finfo(torch.float32).eps


def _batch(model, images, seed, size, eps):
    """A batch smoothed with one ``eps`` (0: hard labels), or mixed in independent pairs when ``eps`` is None, in the
    model's dtype: ``(gradients, labels (B, C), head inputs (B, d))``."""
    generator = torch.Generator().manual_seed(seed)
    num_classes, dtype = model.head.out_features, model.head.weight.dtype
    x = images[torch.randperm(images.shape[0], generator=generator)[:size]].to(dtype)
    classes = torch.randint(num_classes, (size,), generator=generator)
    one_hot = torch.nn.functional.one_hot(classes, num_classes).to(dtype)
    if eps is None:
        partner = torch.nn.functional.one_hot((classes + torch.randint(1, num_classes, (size,), generator=generator))
                                              % num_classes, num_classes).to(dtype)
        weight = torch.empty(size, 1, dtype=dtype).uniform_(0.55, 0.95, generator=generator)
        targets = weight * one_hot + (1 - weight) * partner
    else:
        targets = (1 - eps) * one_hot + eps / num_classes
    gradients, features = batch_gradients(model, x, targets)
    return gradients, targets, features


def _counts(labels):
    return torch.bincount(labels.argmax(1), minlength=labels.shape[1])


@pytest.mark.parametrize("eps", [0.15, 0.0])
def test_a_batch_of_eight_is_solved_from_its_counts(cifar10, resnet18, eps):
    gradients, labels, features = _batch(resnet18, cifar10[0], 11, 8, eps)
    head = resnet18.head
    found = solve_jointly(gradients["head.weight"], head.weight.detach(), head.bias.detach(), gradients["head.bias"],
                          _counts(labels), precision=PRECISION)
    assert found.features is not None and found.misfit <= 10 * PRECISION
    pairs, cosine = paired(found.features, features)
    assert cosine > 1 - 1e-6
    matched = found.features[pairs]
    # float32 gradients of 8 examples pin each feature to a few 1e-4 (measured up to 2.4e-4)
    assert float(((matched - features.double()).norm(dim=1) / features.double().norm(dim=1)).max()) < 1e-3
    logits = matched @ head.weight.detach().double().T + head.bias.detach().double()
    recovered = torch.softmax(logits, -1) - found.errors[pairs]
    assert float((recovered - labels.double()).abs().max()) < 1e-3


def test_recover_batch_reads_every_example_and_eps_from_the_joint_solve(cifar10, resnet18):
    """Whatever the joint solve determines is right; where a second batch fits within the rounding (a runner-up
    under 10 units) it refuses, so not every batch need be read (measured: all three are read)."""
    solved = 0
    for seed in (10, 11, 12):
        gradients, labels, features = _batch(resnet18, cifar10[0], seed, 8, 0.2)
        result = gradleak.recover_batch(resnet18, gradients, batch_size=8)
        assert torch.equal(result.counts, _counts(labels))
        if result.method != "split" or not result.determined:
            assert "solved as one system" in result.split_message
            continue
        solved += 1
        assert result.extra["split"].found_by == "joint" and abs(result.eps - 0.2) < 1e-5
        recovered = torch.stack([example.feature for example in result.examples])
        pairs, cosine = paired(recovered, features)
        assert cosine > 0.999
        found_labels = torch.stack([result.examples[int(n)].label for n in pairs]).double()
        assert float((found_labels - labels.double()).abs().max()) < 1e-3
    assert solved >= 2


def test_the_solve_from_the_counts_goes_before_the_search_by_zeros(cifar10, resnet18):
    """ResNet18's features are ReLU outputs averaged over space, with few exact zeros: the solve from the counts
    answers a batch of 8 before any row is drawn (on this batch the search by zeros, tried first, had drawn 50,000
    rows in vain)."""
    gradients, labels, features = _batch(resnet18, cifar10[0], 12, 8, 0.2)
    result = gradleak.recover_batch(resnet18, gradients, batch_size=8)
    split = result.extra["split"]
    assert result.determined and split.found_by == "joint" and split.draws == 0
    pairs, cosine = paired(torch.stack([example.feature for example in result.examples]), features)
    assert cosine > 0.999
    found_labels = torch.stack([result.examples[int(n)].label for n in pairs]).double()
    assert float((found_labels - labels.double()).abs().max()) < 1e-3


def test_a_weight_update_of_unknown_learning_rate_is_solved_with_its_scale(cifar10, resnet18):
    """The spans do not depend on the gradient's scale, and 1/s is fitted inside the solve: a client's SGD delta of
    8 examples (lr not told) gives its examples and -lr."""
    gradients, labels, features = _batch(resnet18, cifar10[0], 10, 8, 0.2)
    update = {name: -0.05 * g for name, g in gradients.items()}
    result = gradleak.recover_batch(resnet18, update, batch_size=8, gradient_scale="unknown")
    assert result.method == "split" and result.extra["split"].found_by == "joint" and result.determined
    assert abs(result.gradient_scale / -0.05 - 1) < 1e-4 and abs(result.eps - 0.2) < 1e-5
    recovered = torch.stack([example.feature for example in result.examples])
    pairs, cosine = paired(recovered, features)
    assert cosine > 0.999
    found_labels = torch.stack([result.examples[int(n)].label for n in pairs]).double()
    assert float((found_labels - labels.double()).abs().max()) < 1e-3


def test_a_float64_batch_is_solved_to_float64_rounding(cifar10, resnet18):
    """A float64 gradient is held to what its own rounding leaves, and the solve does not give up on it early: its
    starts converge more slowly in units of float64 rounding than a float32 gradient's in its own (measured: 1e-7 to
    1e-5 relative at step 20, where a give-up at 1e4 float64 units refused two of these three batches)."""
    model = copy.deepcopy(resnet18).double()
    for seed in (10, 11, 12):
        gradients, labels, features = _batch(model, cifar10[0], seed, 8, 0.15)
        result = gradleak.recover_batch(model, gradients, batch_size=8)
        assert result.determined and result.extra["split"].found_by == "joint"
        assert abs(result.eps - 0.15) < 1e-12  # not rounded through float32 on its way out
        pairs, cosine = paired(torch.stack([example.feature for example in result.examples]), features)
        assert cosine > 1 - 1e-12
        found_labels = torch.stack([result.examples[int(n)].label for n in pairs])
        assert found_labels.dtype == torch.float64 and float((found_labels - labels).abs().max()) < 1e-12


def test_wrong_counts_leave_no_solution(cifar10, resnet18):
    """The system is overdetermined: moving one example to another class leaves nothing that fits."""
    gradients, labels, _ = _batch(resnet18, cifar10[0], 11, 8, 0.15)
    counts = _counts(labels)
    held, empty = int(counts.argmax()), int(counts.argmin())
    counts[held] -= 1
    counts[empty] += 1
    head = resnet18.head
    found = solve_jointly(gradients["head.weight"], head.weight.detach(), head.bias.detach(), gradients["head.bias"],
                          counts, precision=PRECISION)
    assert found.features is None and found.candidates == 0 and found.misfit > 10 * PRECISION


def test_a_batch_mixed_in_pairs_is_never_solved_with_confidence(cifar10, resnet18):
    """Labels outside the model (each example mixed with its own partner and weight): no determined answer."""
    gradients, labels, _ = _batch(resnet18, cifar10[0], 13, 8, None)
    result = gradleak.recover_batch(resnet18, gradients, batch_size=8)
    assert not result.determined
    assert result.method == "class_mass" and "solved as one system" in result.split_message


def test_batch_sizes_beyond_the_head_and_counts_that_miss_b_are_refused(cifar10, resnet18):
    gradients, labels, _ = _batch(resnet18, cifar10[0], 11, 8, 0.15)
    head = resnet18.head
    with pytest.raises(ValueError, match="B <= C - 1"):
        solve_jointly(gradients["head.weight"], head.weight.detach(), head.bias.detach(), gradients["head.bias"],
                      torch.ones(10, dtype=torch.long), precision=PRECISION)
    with pytest.raises(ValueError, match="counts sum to 7"):
        split_batch(resnet18, gradients, batch_size=8, counts=_counts(labels[:7]), max_draws=1000)


def test_lattice_counts_always_sum_to_the_batch_size():
    """A class mass far from every lattice point (eps near 1 blows the rounding up) still gets counts of B."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        mass = torch.rand(10, generator=generator, dtype=torch.float64)
        mass = 4 * mass / mass.sum()
        assert int(fit_lattice(mass, 4).counts.sum()) == 4


@pytest.fixture(scope="module")
def cifar100_lenet():
    """CIFAR-100 images and an untrained LeNet (PyTorch's init) with 100 classes: sigmoid features, nearly parallel
    between images, which leave the split by labels undetermined and the joint residual higher than ResNet18's."""
    from gradleak.data import load_samples
    from gradleak.models import build_model
    return load_samples("cifar100")[0], build_model("lenet", 100, head_bias=True, init="default", seed=3)


@pytest.mark.parametrize("size, seed", [(8, 0), (8, 1)])
def test_a_batch_above_ten_rounding_units_is_solved_within_its_own_rounding(cifar100_lenet, size, seed):
    """Nearly parallel features leave the batch itself 10 to 13 rounding units from its gradient (at B = 8 of 100
    classes), as much as the rounding of the gradient its own features give: it is solved."""
    images, model = cifar100_lenet
    head = model.head
    gradients, labels, features = _batch(model, images, seed, size, 0.0)
    found = solve_jointly(gradients["head.weight"], head.weight.detach(), head.bias.detach(),
                          gradients["head.bias"], _counts(labels), precision=PRECISION)
    assert found.features is not None
    pairs, cosine = paired(found.features, features)
    assert cosine > 0.999
    logits = found.features[pairs] @ head.weight.detach().double().T + head.bias.detach().double()
    recovered = torch.softmax(logits, -1) - found.errors[pairs]
    assert float((recovered - labels.double()).abs().max()) < 1e-3


def test_a_batch_whose_examples_the_gradient_does_not_pin_is_refused(cifar100_lenet):
    """At B = 16 of 100 classes LeNet's features are so nearly dependent that the solve converges (the batch
    itself at about 45 rounding units, within its own rounding) but the examples' errors, read back from the
    gradient, move by far more than 1e-3 under that rounding: refused."""
    images, model = cifar100_lenet
    head = model.head
    gradients, labels, _ = _batch(model, images, 0, 16, 0.0)
    found = solve_jointly(gradients["head.weight"], head.weight.detach(), head.bias.detach(), gradients["head.bias"],
                          _counts(labels), precision=PRECISION)
    assert found.features is None and found.candidates > 0


def test_a_split_that_is_not_determined_gives_way_to_the_joint_solve(cifar100_lenet):
    """The labels split this batch of 4, but not every example is determined (their own gradients, read off G by
    least squares, carry 6e-4, twice the bound, and at float32's precision some fail); solved at once from the class
    mass's counts, every example is."""
    images, model = cifar100_lenet
    gradients, labels, features = _batch(model, images, 11, 4, 0.1)
    alone = split_batch(model, gradients, batch_size=4, max_draws=1000)
    assert alone.found_by == "labels" and not alone.determined
    result = gradleak.recover_batch(model, gradients, batch_size=4)
    assert result.method == "split" and result.determined and result.extra["split"].found_by == "joint"
    assert abs(result.eps - 0.1) < 1e-5
    recovered = torch.stack([example.feature for example in result.examples])
    pairs, cosine = paired(recovered, features)
    assert cosine > 0.999
    found_labels = torch.stack([result.examples[int(n)].label for n in pairs]).double()
    assert float((found_labels - labels.double()).abs().max()) < 1e-3


@pytest.mark.parametrize("scale_known", [True, False])
def test_the_closed_form_normal_equations_match_autodiff(scale_known):
    """J^T J and J^T r, summed block by block in closed form, against forward-mode autodiff of the residuals."""
    generator = torch.Generator().manual_seed(0)
    num_classes, dim, size = 12, 20, 5
    weight = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    bias = torch.randn(num_classes, generator=generator, dtype=torch.float64)
    features = torch.rand(size, dim, generator=generator, dtype=torch.float64)
    classes = torch.tensor([0, 0, 3, 7, 9])
    labels = 0.8 * torch.nn.functional.one_hot(classes, num_classes).double() + 0.2 / num_classes
    errors = torch.softmax(features @ weight.T + bias, -1) - labels
    system = JointSystem(errors.T @ features / size, weight, bias, errors.mean(0),
                         torch.bincount(classes, minlength=num_classes), scale_known)
    x = torch.randn(3, size * size + 1, generator=generator, dtype=torch.float64)
    r = system.residuals(x)
    matrix, pull = system.normal_equations(x, r)
    jacobian = torch.func.vmap(torch.func.jacfwd(lambda point: system.residuals(point[None])[0]))(x)
    torch.testing.assert_close(matrix, jacobian.transpose(-1, -2) @ jacobian, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pull, (jacobian.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1), rtol=1e-10,
                               atol=1e-10)


def test_examples_solved_at_once_are_judged_at_the_rounding_they_carry(cifar100_lenet):
    """Each example's own gradient, derived from an ill-conditioned batch (LeNet, 100 classes, B = 8), carries more
    than float32's rounding (measured by re-running the solve on the gradient the answer gives); judged at that
    precision, every example is determined, and right."""
    images, model = cifar100_lenet
    gradients, labels, features = _batch(model, images, 0, 8, 0.0)
    result = gradleak.recover_batch(model, gradients, batch_size=8)
    split = result.extra["split"]
    assert result.method == "split" and result.determined and split.found_by == "joint"
    recovered = torch.stack([example.feature for example in result.examples])
    pairs, cosine = paired(recovered, features)
    assert cosine > 0.999
    found_labels = torch.stack([result.examples[int(n)].label for n in pairs]).double()
    assert float((found_labels - labels.double()).abs().max()) < 1e-3
    head = model.head
    solved = solve_jointly(gradients["head.weight"], head.weight.detach(), head.bias.detach(), gradients["head.bias"],
                           _counts(labels), precision=PRECISION)
    assert bool((solved.precision > PRECISION).any()) and float(solved.precision.max()) < 1e-3 / 3
