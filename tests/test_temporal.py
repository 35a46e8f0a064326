"""The trajectory model (frugal.saccade.temporal): windows of blocks one after another, computed
sparsely, against a dense reference; its halt; its teacher; training it through frugal.train."""

import copy

import pytest
import torch
import torch.nn.functional as F

from frugal.measure import count_macs
from frugal.saccade import GlimpseTeacher, SaccadicCNN, TrajectoryCNN


def twin_and_model(glimpses=3, window=2, size=(30, 30), block=8, **kw):
    torch.manual_seed(0)
    twin = SaccadicCNN(1, size, 10, width=4, block_size=block, kernel_sizes=(3,), dense=True).eval()
    model = TrajectoryCNN(1, size, 10, width=4, block_size=block, window=window, glimpses=glimpses, **kw)
    missing = model.load_state_dict(twin.state_dict(), strict=False)
    assert missing.unexpected_keys == ["steps"]  # every weight of the twin has its place (steps: its budget count)
    with torch.no_grad():  # a where-to-look of its own, so the windows move
        model.where.weight.normal_(0, 0.3)
        model.where.bias.fill_(0.7)
    return twin, model


def reference(model: TrajectoryCNN, x: torch.Tensor, order: torch.Tensor, steps: int) -> torch.Tensor:
    """The model's prediction after its first `steps` glimpses, whose blocks `order` (B, gh, gw) gives
    (the glimpse that computed each, from 1), computed with dense convs: at each step every stage's
    conv over the whole map, kept at the new blocks; a stage's input is the image, or the pooled
    outputs kept so far (zero elsewhere); a max per block; the head on every block seen."""
    x = F.pad(x, model.pad)
    b, (gh, gw) = x.shape[0], model.grid
    seen = torch.zeros(b, gh, gw, dtype=torch.bool)
    g = torch.zeros(b, model.fc.in_features, gh, gw)
    kept = [torch.zeros(b, st.out_channels, gh * st.block_size, gw * st.block_size) for st in model.stages]
    for t in range(steps):
        new = order == t + 1
        for j, stage in enumerate(model.stages):
            size = stage.block_size
            mask = new.repeat_interleave(size, 1).repeat_interleave(size, 2)[:, None]
            out = F.relu(stage.forward_dense(F.max_pool2d(kept[j - 1], 2) if j else x))
            kept[j] = torch.where(mask, out, kept[j])
        g = torch.where(new[:, None], F.max_pool2d(kept[-1], model.stages[-1].block_size), g)
        seen |= new
    m = F.relu(model.mix(g)) * seen[:, None]
    return model.fc(m.amax(dim=(2, 3)))


@pytest.mark.parametrize("window,glimpses", [(2, 3), (3, 2), (1, 4)])
def test_the_trajectory_computes_what_dense_convs_compute_on_its_windows(window, glimpses):
    _, model = twin_and_model(glimpses=glimpses, window=window)
    model.eval()
    x = torch.randn(6, 1, 30, 30)
    with torch.no_grad():
        sparse = model(x)  # inference: the head updated where the seen blocks changed
    rec = model.trajectory
    assert (rec.glimpses == glimpses).all()
    with torch.no_grad():
        torch.testing.assert_close(sparse, reference(model, x, rec.order, glimpses), rtol=1e-4, atol=1e-5)
    dense_head = model(x)  # with gradients on: the dense head, as in training
    torch.testing.assert_close(dense_head, sparse, rtol=1e-4, atol=1e-5)
    # each window adds blocks not seen before, and the blocks seen are the windows' union
    for i in range(6):
        cover = torch.zeros(model.grid, dtype=torch.bool)
        for r, c in rec.anchors[i].tolist():
            assert r >= 0
            before = int(cover.sum())
            cover[r:r + window, c:c + window] = True
            assert int(cover.sum()) > before
        assert int(cover.sum()) == int(rec.blocks_seen[i])
        assert torch.equal(cover, rec.order[i] > 0)


@pytest.mark.parametrize("blocks,glimpses", [(3, 3), (5, 2), (1, 4)])
def test_glimpses_of_free_blocks_take_the_unseen_blocks_wanted_most(blocks, glimpses):
    _, model = twin_and_model(glimpses=glimpses, window=None, blocks=blocks)
    model.eval()
    x = torch.randn(6, 1, 30, 30)
    with torch.no_grad():
        sparse = model(x)
        rec = model.trajectory
        torch.testing.assert_close(sparse, reference(model, x, rec.order, glimpses), rtol=1e-4, atol=1e-5)
        # the scores each step chose by: the coarse view plus the memory of the blocks seen before it
        prior = model.policy(F.pad(x, model.pad))[0][:, 0]
    assert rec.anchors is None and (rec.glimpses == glimpses).all()
    for t, score in enumerate(rec.scores):
        new = rec.order == t + 1
        assert (new.flatten(1).sum(1) == blocks).all()  # n blocks a glimpse, each computed once
        assert not (new & rec.seen_before[t]).any()
        for i in range(6):  # no unseen block left out wants more than one taken
            unseen = ~rec.seen_before[t][i]
            assert score[i][new[i]].min() >= score[i][unseen & ~new[i]].max()
    with torch.no_grad():  # nothing seen yet: the coarse view, and the memory's conv of zeros
        empty = torch.zeros(6, model.where.in_channels, *model.grid)
        torch.testing.assert_close(rec.scores[0], prior + model.where(empty)[:, 0])
    dense_head = model(x)  # with gradients on, as in training
    torch.testing.assert_close(dense_head, sparse, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        TrajectoryCNN(1, (30, 30), 10, block_size=8, window=2, blocks=3)
    with pytest.raises(ValueError, match="blocks"):
        TrajectoryCNN(1, (30, 30), 10, block_size=8, blocks=17)  # a 4x4 grid


def test_scratch_memory_reused_from_call_to_call_carries_nothing_over():
    _, model = twin_and_model(glimpses=4, window=None, blocks=3)
    model.eval()
    fresh = copy.deepcopy(model)  # a copy carries no scratch memory: its call starts from fresh zeros
    big, small = torch.randn(7, 1, 30, 30), torch.randn(3, 1, 30, 30)
    with torch.no_grad():
        expected = fresh(small)
        model(big)  # fills the scratch memory with another batch's maps and block vectors
        got = model(small)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(model.trajectory.order, fresh.trajectory.order)
    assert "_workspace" in model.__dict__ and "_workspace" not in copy.deepcopy(model).__dict__


def test_it_stops_when_confident_and_when_nothing_is_left_to_see():
    _, model = twin_and_model(glimpses=8, window=2)
    model.eval()
    x = torch.randn(5, 1, 30, 30)
    with torch.no_grad():
        model(x)
        full = model.trajectory
        assert (full.blocks_seen == 16).all()  # a 4x4 grid: every block seen, then it stops
        assert (full.glimpses < 8).all()
        macs_all = count_macs(model, x)
        model.halt = 1e-3  # any prediction is this confident: one glimpse each
        one = model(x)
        assert (model.trajectory.glimpses == 1).all() and (model.trajectory.blocks_seen == 4).all()
        macs_one = count_macs(model, x)
        assert macs_one < 0.5 * macs_all  # the blocks not looked at cost nothing
        torch.testing.assert_close(one, reference(model, x, model.trajectory.order, 1), rtol=1e-4, atol=1e-5)
        # a threshold between: each example stops at the first glimpse whose confidence reaches it
        model.halt = None
        model(x)
        conf = model.trajectory.confidence
        halt = float(conf[:, 0].median())
        model.halt = halt
        model(x)
        for i in range(5):
            steps = int(model.trajectory.glimpses[i])
            reached = (conf[i, :int(full.glimpses[i])] >= halt).nonzero()
            assert steps == (int(reached[0]) + 1 if len(reached) else int(full.glimpses[i]))


def test_training_may_take_fewer_glimpses_than_inference():
    _, model = twin_and_model(glimpses=5, window=1, train_glimpses=2)
    x = torch.randn(3, 1, 30, 30)
    model.train()
    model(x)
    assert (model.trajectory.glimpses == 2).all() and len(model.trajectory.logits) == 2
    model.eval()
    with torch.no_grad():
        model(x)
    assert (model.trajectory.glimpses == 5).all()
    with pytest.raises(ValueError, match="train_glimpses"):
        TrajectoryCNN(1, (30, 30), 10, block_size=8, glimpses=3, train_glimpses=4)


def test_the_teacher_teaches_where_the_twins_evidence_is():
    """Trained by the teacher alone, the model's first window goes where the twin's evidence is."""
    torch.manual_seed(0)
    twin, model = twin_and_model(glimpses=2, window=2)
    teacher = GlimpseTeacher(twin, weight=1.0)
    x = torch.zeros(64, 1, 30, 30)
    for i in range(64):  # a bright square somewhere: the twin's features peak around it
        r, c = torch.randint(0, 24, (2,)).tolist()
        x[i, 0, r:r + 6, c:c + 6] = 3.0
    params = list(model.policy.parameters()) + list(model.where.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(60):
        model(x)
        loss = teacher(model, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    before = {n: p.clone() for n, p in model.named_parameters() if n.startswith(("stages", "mix", "fc"))}
    model(x)
    teacher(model, x).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in before)  # the backbone is not its pupil


def test_anytime_training_through_frugal_train_learns_and_resumes(tmp_path):
    from frugal.train import TrainConfig, load_run, train

    twin_cfg = TrainConfig(task="digits", model="blockcnn", model_kw={"width": 8, "block_size": 4}, epochs=5,
                           optimizer="adam", lr=3e-3, seed=0)
    twin = train(twin_cfg, tmp_path / "twin", quiet=True, progress=False)
    cfg = TrainConfig(task="digits", model="trajectory", model_kw={"width": 8, "block_size": 4, "window": 1,
                                                                   "glimpses": 3},
                      epochs=5, optimizer="adam", lr=3e-3, seed=0, init_from=str(tmp_path / "twin"))
    res = train(cfg, tmp_path / "traj", hooks=[GlimpseTeacher(tmp_path / "twin", distill=1.0)], quiet=True,
                progress=False)
    assert res.test_acc > 0.4 and twin.test_acc > 0.4  # 10 classes: chance is 0.1
    model, _, _ = load_run(tmp_path / "traj")  # a run folder rebuilds it
    assert isinstance(model, TrajectoryCNN) and model.glimpses == 3
    with pytest.raises(ValueError, match="teacher"):
        train(cfg, tmp_path / "traj", hooks=[GlimpseTeacher(tmp_path / "twin", distill=0.5)], resume=True,
              quiet=True, progress=False)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="window"):
        TrajectoryCNN(1, (30, 30), 10, block_size=8, window=5)
    with pytest.raises(ValueError, match="glimpses"):
        TrajectoryCNN(1, (30, 30), 10, block_size=8, glimpses=0)
    _, model = twin_and_model()
    model.eval()
    model.halt = 1.5
    with pytest.raises(ValueError, match="halt"):
        model(torch.randn(1, 1, 30, 30))
    with pytest.raises(ValueError, match="dense twin"):
        GlimpseTeacher(model)


@pytest.mark.parametrize("glimpse", [{"window": 2}, {"window": None, "blocks": 3}])
def test_explain_draws_each_trajectory(tmp_path, glimpse):
    _, model = twin_and_model(glimpses=3, **glimpse)
    images = torch.randint(0, 255, (4, 1, 30, 30), dtype=torch.uint8)
    path = model.explain(torch.randn(4, 1, 30, 30), images, torch.arange(4), tmp_path / "t.png")
    assert path.exists() and path.stat().st_size > 1000


def test_a_stopping_rule_names_the_halt_and_the_cap_and_sets_them():
    from frugal.saccade.temporal import stopping_rule

    assert stopping_rule(0.99) == ("halt 0.99", {"halt": 0.99})
    assert stopping_rule(0.999, 3) == ("halt 0.999 max 3", {"halt": 0.999, "glimpses": 3})
    assert stopping_rule(None, 2) == ("glimpses 2", {"halt": None, "glimpses": 2})
    with pytest.raises(ValueError, match="stopping rule"):
        stopping_rule()
    _, model = twin_and_model(glimpses=8, window=2)
    model.eval()
    for name, value in stopping_rule(1e-3, 2)[1].items():  # any prediction is this confident
        setattr(model, name, value)
    with torch.no_grad():
        model(torch.randn(4, 1, 30, 30))
    assert (model.trajectory.glimpses == 1).all()
    for name, value in stopping_rule(None, 2)[1].items():
        setattr(model, name, value)
    with torch.no_grad():
        model(torch.randn(4, 1, 30, 30))
    assert (model.trajectory.glimpses == 2).all()
