import pytest
import torch

from frugal.measure import count_macs
from frugal.models import create_model
from frugal.saccade import SaccadicCNN, auto_block_size


def twins(image_size=(60, 60), **kw):
    torch.manual_seed(0)
    sacc = create_model("saccadic", image_size=image_size, **kw).eval()
    dense = create_model("blockcnn", image_size=image_size).eval()
    # give the saccadic net the dense twin's weights for level 1 and the shared layers
    missing = sacc.load_state_dict(dense.state_dict(), strict=False).missing_keys
    assert all(k.startswith("policy.") or ".1" in k or k == "steps" for k in missing), missing  # level 2, policy
    return sacc, dense


@pytest.mark.parametrize("image_size", [(60, 60), (28, 28), (50, 70)])
def test_every_block_at_level_1_reproduces_the_dense_twin(image_size):
    sacc, dense = twins(image_size)
    gh, gw = sacc.grid
    x = torch.randn(3, 1, *image_size)
    sacc.fixed_levels = torch.ones(3, gh, gw, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(sacc(x), dense(x), atol=1e-4, rtol=1e-4)


def test_macs_follow_the_attended_blocks():
    # the stages and the head's mix conv run only on attended blocks; the policy and the classifier always
    sacc, dense = twins()
    gh, gw = sacc.grid
    x = torch.randn(2, 1, 60, 60)
    policy_macs = count_macs(sacc.policy, torch.nn.functional.pad(x, sacc.pad))
    fc_macs = 64 * 10
    sacc.fixed_levels = torch.zeros(2, gh, gw, dtype=torch.long)
    assert count_macs(sacc, x) == policy_macs + fc_macs  # all skipped: no stage or head work at all
    sacc.fixed_levels = torch.ones(2, gh, gw, dtype=torch.long)
    assert count_macs(sacc, x) == policy_macs + count_macs(dense, x)
    half = torch.zeros(2, gh, gw, dtype=torch.long)
    half[:, :, : gw // 2 + 1] = 1
    sacc.fixed_levels = half
    frac = (half > 0).float().mean().item()
    assert count_macs(sacc, x) == pytest.approx(policy_macs + fc_macs + frac * (count_macs(dense, x) - fc_macs))


def test_the_head_sees_only_attended_blocks():
    # what a skipped block would have shown must not reach the prediction
    torch.manual_seed(0)
    model = create_model("saccadic", image_size=(60, 60)).eval()
    gh, gw = model.grid
    levels = torch.zeros(1, gh, gw, dtype=torch.long)
    levels[0, 1:3, 1:3] = 1
    model.fixed_levels = levels
    x = torch.randn(1, 1, 60, 60)
    far = x.clone()
    far[..., 48:, 48:] = 5.0  # a block 2 cells away from every attended one, beyond even the stages' halo
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(far))


@pytest.mark.parametrize("estimator", ["gumbel", "reinforce"])
def test_every_parameter_learns_under_each_estimator(estimator):
    torch.manual_seed(0)
    model = create_model("saccadic", image_size=(28, 28), estimator=estimator, consistency_weight=0.1).train()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    logits = model(x)
    (torch.nn.functional.cross_entropy(logits, y) + model.extra_loss(x, logits, y)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.startswith("policy."):
            assert p.grad.abs().sum() > 0, f"{name}: the policy gets no learning signal"


@pytest.mark.parametrize("estimator", ["gumbel", "reinforce"])
def test_a_tighter_budget_makes_the_policy_attend_less(estimator):
    torch.manual_seed(0)
    model = create_model("saccadic", image_size=(28, 28), estimator=estimator, budget=0.05, cost_weight=5.0,
                         budget_warmup=0, attend_init=0.5).train()
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    opt = torch.optim.Adam(model.policy.parameters(), lr=1e-2)

    def attended():
        with torch.no_grad():
            model.eval()
            model(x)
            model.train()
        return (model.attention.levels > 0).float().mean().item(), model.attention.expected_cost.mean().item()

    frac0, cost0 = attended()
    for _ in range(30):
        logits = model(x)
        loss = model.extra_loss(x, logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    frac1, cost1 = attended()
    assert cost1 < cost0 - 0.2 and frac1 < frac0, (cost0, cost1, frac0, frac1)


def test_eval_is_deterministic_and_training_samples():
    torch.manual_seed(0)
    model = create_model("saccadic", image_size=(28, 28))
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    a = model(x).detach()
    la = model.attention.levels.clone()
    assert torch.equal(model(x).detach(), a) and torch.equal(model.attention.levels, la)
    model.train()
    draws = set()
    for _ in range(5):
        model(x)
        draws.add(tuple(model.attention.levels.flatten().tolist()))
    assert len(draws) > 1  # Gumbel sampling explores


def test_block_size_rules():
    assert auto_block_size((28, 28)) == 4 and auto_block_size((60, 60)) == 12 and auto_block_size((100, 100)) == 20
    with pytest.raises(ValueError, match="block_size must be a multiple of 4"):
        SaccadicCNN(1, (60, 60), 10, block_size=10)
    with pytest.raises(ValueError, match="unknown estimator 'ppo'"):
        create_model("saccadic", estimator="ppo")


def test_gumbel_training_pass_equals_the_sparse_pass_on_the_same_levels():
    # training runs every level densely and masks (for the gradient); inference runs only the chosen
    # blocks: for the same choice the two must agree
    torch.manual_seed(0)
    model = create_model("saccadic", image_size=(60, 60), attend_init=0.5).train()
    x = torch.randn(4, 1, 60, 60)
    train_out = model(x)
    assert model.attention.weights.requires_grad  # the masked dense path ran
    levels = model.attention.levels.clone()
    assert (levels == 0).any() and (levels == 1).any() and (levels == 2).any()
    model.eval()
    model.fixed_levels = levels
    with torch.no_grad():
        torch.testing.assert_close(model(x), train_out.detach(), atol=1e-4, rtol=1e-4)


def test_the_task_loss_alone_teaches_the_policy_about_skipped_blocks():
    # with the sparse pass a skipped block's output is 0 whatever its gate, so skipping got no task
    # gradient and the policy collapsed to skipping everything; the masked pass must give one
    torch.manual_seed(0)
    model = create_model("saccadic", image_size=(28, 28), attend_init=0.5, cost_weight=0.0).train()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    logits = model(x)
    att = model.attention
    att.logits.retain_grad()
    torch.nn.functional.cross_entropy(logits, y).backward()
    skipped = att.levels == 0  # (B, gh, gw)
    assert skipped.any()
    grad_at_skipped = att.logits.grad.abs().sum(1)[skipped]  # (n,)
    assert (grad_at_skipped > 0).float().mean() > 0.5


def test_budget_warms_up_from_dense_to_the_target():
    model = create_model("saccadic", image_size=(28, 28), budget=0.2, budget_warmup=10).train()
    assert model.current_budget() == pytest.approx(1.0)
    x, y = torch.randn(2, 1, 28, 28), torch.randint(0, 10, (2,))
    seen = []
    for _ in range(12):
        seen.append(model.current_budget())
        model.extra_loss(x, model(x), y)
    assert seen[5] == pytest.approx(0.2 + 0.8 * 0.5) and seen[10] == pytest.approx(0.2) == seen[11]
    assert all(a >= b for a, b in zip(seen, seen[1:]))
    assert "steps" in model.state_dict()  # the warm-up survives a checkpoint and resume


@pytest.mark.parametrize("training", [False, True])
def test_every_example_attends_at_least_min_blocks(training):
    torch.manual_seed(0)
    model = create_model("saccadic", image_size=(60, 60), min_blocks=3, attend_init=0.5)
    with torch.no_grad():
        model.policy.logits.bias[0] = 20.0  # a policy that wants to skip everything
    model.train(training)
    model(torch.randn(5, 1, 60, 60))
    att = model.attention
    per_example = (att.levels > 0).flatten(1).sum(1)
    assert per_example.tolist() == [3] * 5
    # the forced blocks are the ones the policy was least willing to skip
    margin = (att.logits[:, 1:].amax(1) - att.logits[:, 0]).flatten(1)  # (B, n)
    chosen = (att.levels > 0).flatten(1)
    assert torch.equal(chosen.nonzero()[:, 1].view(5, 3).sort(1).values, margin.topk(3, 1).indices.sort(1).values)


def test_attend_init_sets_the_starting_probability_of_level_1():
    model = create_model("saccadic", image_size=(28, 28), attend_init=0.8).eval()
    model(torch.zeros(1, 1, 28, 28))
    with torch.no_grad():
        model.policy.logits.weight.zero_()
        model(torch.randn(2, 1, 28, 28))
    probs = model.attention.logits.softmax(1)
    torch.testing.assert_close(probs[:, 1], torch.full_like(probs[:, 1], 0.8))
    with pytest.raises(ValueError, match="attend_init is a probability"):
        create_model("saccadic", attend_init=1.0)


@pytest.mark.parametrize("mode, rises", [("target", True), ("cap", False)])
def test_a_target_budget_pulls_a_policy_that_attends_too_little_up(mode, rises):
    torch.manual_seed(0)
    model = create_model("saccadic", image_size=(28, 28), budget=0.6, budget_warmup=0, budget_mode=mode,
                         min_blocks=0).train()
    with torch.no_grad():
        model.policy.logits.bias.copy_(torch.tensor([3.0, 0.0, 0.0]))  # mostly skip: cost ~0.18
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    opt = torch.optim.Adam(model.policy.parameters(), lr=1e-2)
    costs = []
    for _ in range(20):
        logits = model(x)
        costs.append(model.attention.expected_cost.mean().item())
        loss = model.extra_loss(x, logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (costs[-1] > costs[0] + 0.1) == rises, costs
    with pytest.raises(ValueError, match="budget_mode must be one of"):
        create_model("saccadic", budget_mode="floor")


def test_an_inference_fraction_attends_each_images_most_wanted_blocks():
    torch.manual_seed(0)
    model = create_model("saccadic", image_size=(60, 60)).eval()
    gh, gw = model.grid
    x = torch.randn(3, 1, 60, 60)
    with torch.no_grad():
        logits, _ = model.policy(torch.nn.functional.pad(x, model.pad))
        for f, k in ((0.2, 5), (0.5, 12), (1.0, 25)):
            model.inference_fraction = f
            model(x)
            levels = model.attention.levels
            assert ((levels > 0).flatten(1).sum(1) == k).all()
            margin = (logits[:, 1:].max(1).values - logits[:, 0]).flatten(1)  # (B, n)
            chosen = (levels > 0).flatten(1)
            for b in range(3):  # every attended block wants it at least as much as every skipped one
                if k < gh * gw:
                    assert margin[b][chosen[b]].min() >= margin[b][~chosen[b]].max()
            best = logits[:, 1:].argmax(1) + 1
            assert torch.equal(levels[levels > 0], best[levels > 0])  # at its best non-skip level
        model.inference_fraction = 1.5
        with pytest.raises(ValueError, match="inference_fraction"):
            model(x)
        model.inference_fraction = None
        model(x)
        assert torch.equal(model.attention.levels, logits.argmax(1))  # back to the policy's argmax


@pytest.mark.parametrize("image_size", [(60, 60), (50, 70)])
def test_the_policy_sees_the_adaptive_average_of_the_image(image_size):
    # the fast path (a plain average pool when the blocks divide the image, channels-last inside)
    # must compute what the plain reading of the policy does
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = create_model("saccadic", image_size=image_size).eval()
    x = F.pad(torch.randn(4, 1, *image_size), model.pad)
    gh, gw = model.grid
    pol = model.policy
    convs = [m for m in pol.body if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        logits, _ = pol(x)
        f = F.adaptive_avg_pool2d(x, (4 * gh, 4 * gw))
        for conv in convs:  # conv, ReLU, pool: the textbook order (the policy pools first)
            f = F.max_pool2d(F.relu(conv(f)), 2)
        reference = pol.logits(f)
    assert len(convs) == 2
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,kernel", [((2, 3, 12, 8), (3, 2)), ((1, 1, 4, 4), (1, 1)), ((2, 5, 64, 64), (2, 2)),
                                          ((1, 2, 30, 20), (5, 4))])
def test_mean_pool_is_the_average_pool(shape, kernel):
    import torch.nn.functional as F

    from frugal.saccade.policy import mean_pool

    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(mean_pool(x, *kernel), F.avg_pool2d(x, kernel), rtol=0, atol=1e-12)


def test_a_run_too_short_for_the_budget_warm_up_says_so_and_a_share_of_the_run_fits_any_length(tmp_path):
    """A warm-up in steps (1,000 by default) never ends on a small data set: the run warns. Given as a
    share of the run, the budget is in force by the end however short the run."""
    from frugal.train import TrainConfig, train

    cfg = dict(task="digits", model="saccadic", epochs=1, train_limit=128, batch_size=32, device="cpu")
    with pytest.warns(UserWarning, match="before the compute budget came into force"):
        res = train(TrainConfig(**cfg, model_kw={"block_size": 4}), tmp_path / "steps", quiet=True)
    assert res.model.current_budget() > res.model.budget
    assert "warning: the run ended after 4 training steps" in (tmp_path / "steps" / "log.txt").read_text()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning this time
        res = train(TrainConfig(**cfg, model_kw={"block_size": 4, "budget_warmup": 0.5}), tmp_path / "share",
                    quiet=True)
    assert res.model.warmup_steps() == 2 and res.model.current_budget() == res.model.budget
    with pytest.raises(ValueError, match="begin_run"):
        create_model("saccadic", image_size=(8, 8), block_size=4, budget_warmup=0.5).current_budget()
