import pytest
import torch
import torch.nn.functional as F

from frugal.data import load_task
from frugal.models import create_model
from frugal.saccade.teacher import TwinTeacher, block_evidence


def test_block_evidence_marks_each_channels_winning_block():
    torch.manual_seed(0)
    twin = create_model("blockcnn", image_size=(28, 28)).eval()
    x = torch.randn(4, 1, 28, 28)
    marked = block_evidence(twin, x)
    # reference: the twin's block features, and for each channel the block holding its maximum
    h = F.pad(x, twin.pad)
    for i, stage in enumerate(twin.stages):
        h = F.relu(stage.forward_dense(F.max_pool2d(h, 2) if i else h))
    g = F.max_pool2d(h, twin.stages[-1].block_size)
    b, c, gh, gw = g.shape
    assert marked.shape == (b, gh, gw)
    for n in range(b):
        winners = {int(g[n, k].flatten().argmax()) for k in range(c)}
        assert set(marked[n].flatten().nonzero()[:, 0].tolist()) == winners
    assert ((marked == 0) | (marked == 1)).all()


def test_the_teacher_makes_the_policy_attend_where_the_twin_finds_evidence():
    from types import SimpleNamespace

    torch.manual_seed(0)
    data = load_task("digits")
    x = F.interpolate((data.train.x[:64].float() / 255 - data.mean) / data.std, size=(28, 28), mode="bilinear")
    twin = create_model("blockcnn", image_size=(28, 28))
    target = block_evidence(twin.eval(), x)
    assert 0.05 < float(target.mean()) < 0.95  # some of the 7x7 blocks marked, some not
    model = create_model("saccadic", image_size=(28, 28), budget_warmup=0).train()
    model.requires_grad_(False)
    model.policy.requires_grad_(True)  # the term trains the policy: only its gradients are needed here
    teacher = TwinTeacher(twin, weight=1.0)
    state = SimpleNamespace(model=model)
    opt = torch.optim.Adam(model.policy.parameters(), lr=1e-2)

    def agreement():
        attend = 1 - model.attention.logits.detach().softmax(1)[:, 0]
        return float(attend[target == 1].mean() - attend[target == 0].mean())

    losses = []
    for step in range(90):
        logits = model(x)
        if step == 0:
            before = agreement()
        loss = teacher.extra_loss(state, logits, x, None)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model(x)
    # the BCE halves and the policy now gives marked blocks a higher attend probability than the
    # others (a random twin's marks are hard to predict: 0.17 after 90 steps, 0.24 after 150)
    assert abs(before) < 0.05 and agreement() > 0.1
    assert losses[-1] < 0.6 * losses[0]
    model.eval()
    assert teacher.extra_loss(state, model(x), x, None) is None  # nothing to teach outside training


def test_the_teacher_refuses_a_model_that_is_not_a_dense_twin():
    with pytest.raises(ValueError, match="dense twin"):
        TwinTeacher(create_model("saccadic", image_size=(28, 28)))
    with pytest.raises(ValueError, match="weight"):
        TwinTeacher(create_model("blockcnn", image_size=(28, 28)), weight=-1.0)


def test_a_run_with_a_teacher_resumes_only_with_the_same_weight(tmp_path):
    from frugal.train import TrainConfig, train

    twin_cfg = TrainConfig(task="digits", model="blockcnn", epochs=1, train_limit=128, seed=0, device="cpu")
    train(twin_cfg, tmp_path / "twin", quiet=True, progress=False)
    cfg = TrainConfig(task="digits", model="saccadic", epochs=1, train_limit=128, seed=0, device="cpu",
                      init_from=str(tmp_path / "twin"))
    res = train(cfg, tmp_path / "sacc", hooks=[TwinTeacher(tmp_path / "twin", 0.5)], quiet=True, progress=False)
    assert 0 <= res.test_acc <= 1
    with pytest.raises(ValueError, match="teacher weight 0.5, now 1.0"):
        train(cfg, tmp_path / "sacc", hooks=[TwinTeacher(tmp_path / "twin", 1.0)], resume=True, quiet=True,
              progress=False)
    again = train(cfg, tmp_path / "sacc", hooks=[TwinTeacher(tmp_path / "twin", 0.5)], resume=True, quiet=True,
                  progress=False)
    assert again.test_acc == res.test_acc  # finished: resuming only reloads it
