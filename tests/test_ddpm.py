"""DDPMModule: the forward processes against their closed forms, the samplers against diffusers'
schedulers and against exact Gaussian posteriors, determinism, losses on known inputs, bad input,
checkpoints (EMA) and sampling, and learning on moons and digits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from genlight.diffusion.processes import FlowProcess, VEProcess, VPProcess, make_process, trailing_grid
from genlight.diffusion.samplers import DDIM, DDPM, SAMPLERS, Sampler
from genlight.lightning_modules.ddpm import DDPMModule
from genlight.models.diffusion import mlp2d
from tests.helpers import DQUICK

# quick composed runs (the LM tests' QUICK list names LM data keys)


class Oracle(torch.nn.Module):
    """The exact E[x0 | x_t] for Gaussian data N(m, v), returned as the network's x0 output."""

    def __init__(self, process, m: float, v: float):
        super().__init__()
        self.p, self.m, self.v = process, m, v
        self.config = {"dim": 1}

    def forward(self, x, timestep):
        k = timestep + 1 if isinstance(self.p, VPProcess) else timestep
        k = k.round().long()
        if isinstance(self.p, VEProcess):  # x_t = x0 + N(0, s2)
            s2 = self.p.std(k).double() ** 2
            return (self.m + self.v / (self.v + s2)[:, None] * (x.double() - self.m)).float()
        a = self.p.abar[k][:, None]  # z = sqrt(a) x0 + N(0, 1 - a)
        return (self.m + a.sqrt() * self.v / (a * self.v + 1 - a) * (x.double() - a.sqrt() * self.m)).float()


def module_with(net, process: dict, target="eps", **kw) -> DDPMModule:
    steps = min(50, process["num_steps"])
    return DDPMModule(net=net, process=process, target=target, clip_x0=None, val_steps=steps, test_steps=steps, **kw)


# ---------------------------------------------------------------------------------------------- forward process
def test_ve_training_pair_has_the_closed_form_marginal():
    """x_{t-dt} = x0 + N(0, s^2(t-dt)), x_t = x_{t-dt} + N(0, s^2 dt): mean x0, variance sigma^2 t, and the
    bridge E[x_{t-dt} | x_t, x0] = x_t + (dt/t)(x0 - x_t) that the x_prev target is read through."""
    p = VEProcess(num_steps=10, sigma=2.0)
    n, x0 = 400_000, torch.full((400_000, 1), 0.7)
    g = torch.Generator().manual_seed(0)
    for k in (1, 4, 10):
        kk = torch.full((n,), k)
        x_t, x_prev = p.training_pair(x0, kk, "x_prev", g)
        t = k / 10
        assert x_t.mean().item() == pytest.approx(0.7, abs=0.02)
        assert x_t.var().item() == pytest.approx(4.0 * t, rel=0.02)
        assert x_prev.var().item() == pytest.approx(4.0 * (k - 1) / 10, abs=0.02)
        # regression of x_prev on x_t: slope 1 - dt/t, as the Brownian bridge says
        c = torch.cov(torch.stack([x_t[:, 0], x_prev[:, 0]]))
        assert (c[0, 1] / c[0, 0]).item() == pytest.approx(1 - 1 / k, abs=0.01)
        # the x_prev prediction read as x0: the bridge mean at the true x0 gives back x0
        mu = x_t + (1 / k) * (x0 - x_t)
        assert torch.allclose(p.predict_x0(mu - x_t, x_t, kk, "x_prev"), x0, atol=1e-4)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_vp_closed_form_matches_the_markov_chain(schedule):
    """Simulating z_t = sqrt(1 - beta_t) z_{t-1} + sqrt(beta_t) eps step by step gives mean sqrt(abar_t) x0 and
    variance 1 - abar_t, as Ho et al. eq. 4."""
    p = VPProcess(num_steps=100, schedule=schedule, beta_start=1e-3, beta_end=0.05)
    betas = 1 - p.abar[1:] / p.abar[:-1]
    n = 200_000
    z = torch.full((n,), 1.5, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for k in range(1, 101):
        z = (1 - betas[k - 1]).sqrt() * z + betas[k - 1].sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
        if k in (1, 10, 50, 100):
            a = p.abar[k].item()
            assert z.mean().item() == pytest.approx(math.sqrt(a) * 1.5, abs=0.01)
            assert z.var().item() == pytest.approx(1 - a, abs=0.01)
            closed = p.marginal(torch.full((n, 1), 1.5), torch.full((n,), k), torch.randn(n, 1, generator=g))
            assert closed.var().item() == pytest.approx(1 - a, abs=0.01)


# ---------------------------------------------------------------------------------------------- vs diffusers
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_vp_schedule_and_add_noise_equal_diffusers(schedule):
    from diffusers import DDPMScheduler

    T = 1000
    ours = VPProcess(T, schedule)
    theirs = DDPMScheduler(num_train_timesteps=T, beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule])
    assert torch.allclose(ours.abar[1:].float(), theirs.alphas_cumprod, rtol=1e-5, atol=1e-6)
    x0, eps = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 998, 999])
    assert torch.allclose(ours.marginal(x0, t + 1, eps), theirs.add_noise(x0, eps, t), atol=1e-5)


def _fake_eps(x, timestep):
    return 0.3 * torch.tanh(x) + 0.01 * timestep.float().reshape(-1, *[1] * (x.dim() - 1)) / 100


@pytest.mark.parametrize("steps", [1000, 50])
def test_ddpm_steps_equal_diffusers_ddpm_scheduler(steps):
    """The whole stochastic trajectory, with the same noise, equals DDPMScheduler's (fixed_small variance)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, clip_sample=False, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    p = VPProcess(1000)
    ours = DDPM(p)  # the same loop as diffusers': set_timesteps, then step at each timestep
    ours.set_timesteps(steps)
    assert [k - 1 for k in ours.timesteps] == sched.timesteps.tolist()
    x_ours = x_theirs = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, k in enumerate(ours.timesteps):
        t = torch.tensor(k - 1)
        eps = _fake_eps(x_theirs, t.expand(4))
        x_theirs = sched.step(eps, t, x_theirs, generator=torch.Generator().manual_seed(i)).prev_sample
        x0 = p.predict_x0(_fake_eps(x_ours, t.expand(4)), x_ours, torch.tensor(k), "eps")
        x_ours = ours.step(x0, k, x_ours, generator=torch.Generator().manual_seed(i))
        assert torch.allclose(x_ours, x_theirs, atol=1e-4, rtol=1e-4), f"step {k}"


@pytest.mark.parametrize("steps", [50, 7])
def test_ddim_equals_diffusers_ddim_scheduler_eta0(steps):
    from diffusers import DDIMScheduler

    T = 1001 if steps == 7 else 1000
    sched = DDIMScheduler(num_train_timesteps=T, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    p = VPProcess(T)
    ours = DDIM(p)
    ours.set_timesteps(steps)
    if T % steps == 0:  # diffusers' prev timestep is t - T // steps: the same grid when steps divides T
        assert [k - 1 for k in ours.timesteps] == sched.timesteps.tolist()
    x_ours = x_theirs = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for k in ours.timesteps:
        if T % steps:
            break
        t = torch.tensor(k - 1)
        x_theirs = sched.step(_fake_eps(x_theirs, t.expand(4)), t, x_theirs, eta=0.0).prev_sample
        x0 = p.predict_x0(_fake_eps(x_ours, t.expand(4)), x_ours, torch.tensor(k), "eps")
        x_ours = ours.step(x0, k, x_ours)
        assert torch.allclose(x_ours, x_theirs, atol=1e-4, rtol=1e-4), f"step {k}"


def test_export_is_a_diffusers_pipeline_that_samples_like_us(tmp_path):
    """export_pretrained writes a DDPMPipeline; its DDIM sampling equals ours on the same x_T."""
    from diffusers import DDIMScheduler, DDPMPipeline

    from genlight.models.diffusion import unet2d

    torch.manual_seed(0)
    m = DDPMModule(net=unet2d(8, 1, (8, 8), norm_num_groups=4), process={"name": "vp", "num_steps": 100}, clip_x0=None)
    m.export_pretrained(tmp_path)
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    sched = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(10)
    x = x_T = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(pipe.unet(x, t).sample, t, x, eta=0.0).prev_sample
    assert torch.allclose(m.sample(2, "ddim", 10, x_T=x_T), x, atol=1e-4)


# ---------------------------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("proc", ["ve", "vp"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_recover_gaussian_data_with_the_exact_denoiser(proc, sampler):
    """With the exact E[x0 | x_t] of N(m, v) data, both samplers on the full grid return N(m, v): the DDPM
    reverse kernels and the DDIM update are exact to first order in dt. (Coarse grids are exact for a point
    mass: test_ve_ddim_step_is_nakkirans_lambda_update.)"""
    m, v, n, steps = 0.5, 1.0, 20_000, 1000
    spec = {"name": proc, "num_steps": 1000, "sigma": 3.0}
    module = module_with(Oracle(make_process(**spec), m, v), spec, target="x0", sample_batch_size=n)
    g = torch.Generator().manual_seed(3)
    # start from the exact marginal at t = 1 (the prior N(0, sigma^2) differs from it by the data's spread)
    x_T = module.process.marginal(m + math.sqrt(v) * torch.randn(n, 1, generator=g), torch.tensor(1000),
                                  torch.randn(n, 1, generator=g))
    x = module.sample(n, sampler, steps, generator=g, x_T=x_T)
    assert x.mean().item() == pytest.approx(m, abs=0.03)  # 4 standard errors
    assert x.var().item() == pytest.approx(v, rel=0.06)


def test_ddim_is_deterministic_given_x_T_and_ddpm_is_not():
    torch.manual_seed(0)
    module = module_with(mlp2d(hidden=32, depth=1), {"name": "vp", "num_steps": 50})
    x_T = torch.randn(16, 2)
    a = module.sample(16, "ddim", 50, x_T=x_T, generator=torch.Generator().manual_seed(1))
    b = module.sample(16, "ddim", 50, x_T=x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = module.sample(16, "ddpm", 50, x_T=x_T, generator=torch.Generator().manual_seed(1))
    d = module.sample(16, "ddpm", 50, x_T=x_T, generator=torch.Generator().manual_seed(2))
    e = module.sample(16, "ddpm", 50, x_T=x_T, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(c, d) and torch.equal(c, e)


def test_ve_ddim_step_is_nakkirans_lambda_update():
    """x <- x + lambda (mu(x) - x), lambda = sigma_t / (sigma_{t-dt} + sigma_t), lands exactly on x0 for a
    point mass (x0_hat = x0): DDIM is the exact deterministic map here, for any grid."""
    p = VEProcess(100, sigma=2.0)
    x0 = torch.tensor([[0.3, -0.2]])
    for steps in (100, 10, 1):
        x = x0 + 2.0 * torch.randn(1, 2)
        grid = trailing_grid(100, steps)
        for k, s in zip(grid[:-1], grid[1:]):
            lam = math.sqrt(k) / (math.sqrt(s) + math.sqrt(k))
            mu = x + (k - s) / k * (x0 - x)
            nxt = p.ddim_step(x, x0, k, s)
            assert torch.allclose(nxt, x + lam * (mu - x), atol=1e-6)
            # on the ray from x0 through x_t, at distance sigma_s / sigma_t of it
            assert torch.allclose(nxt - x0, math.sqrt(s / k) * (x - x0), atol=1e-5)
            x = nxt
        assert torch.allclose(x, x0, atol=1e-5)


def test_sampling_grid_and_bad_step_counts():
    assert trailing_grid(1000, 1000) == list(range(1000, -1, -1))
    assert trailing_grid(1000, 50)[:3] == [1000, 980, 960] and trailing_grid(1000, 50)[-1] == 0
    assert len(trailing_grid(1000, 7)) == 8
    with pytest.raises(ValueError, match="steps=1001"):
        trailing_grid(1000, 1001)
    with pytest.raises(ValueError, match="algo.val_steps=2000"):
        DDPMModule(net=mlp2d(), process={"name": "vp", "num_steps": 1000}, val_steps=2000)
    with pytest.raises(ValueError, match=r"algo.target='x_prev' \(the lecture's x_\{t-dt\}\) is not defined for process='vp', which predicts eps \| x0 \| v"):
        DDPMModule(net=mlp2d(), process={"name": "vp", "num_steps": 10}, target="x_prev")
    with pytest.raises(ValueError, match="algo.process.name='vx'"):
        DDPMModule(net=mlp2d(), process={"name": "vx", "num_steps": 10})


def test_a_new_sampler_is_one_class_registered_in_one_place(monkeypatch):
    """A sampler class added to SAMPLERS is checked against the processes it names, accepted by the module's config
    keys and sampled with by `DDPMModule.sample`, with no other edit. Here: a one-step Tweedie jump x <- x0_hat."""

    class Jump(Sampler):
        """Jump to the denoiser's x0 at every step."""

        name = "jump"
        processes = (VPProcess,)

        def transition(self, x0, k, s, x, generator):
            return x0

    monkeypatch.setitem(SAMPLERS, "jump", Jump)
    torch.manual_seed(0)
    module = module_with(mlp2d(hidden=16, depth=1), {"name": "vp", "num_steps": 100}, val_sampler="jump")
    x_T = torch.randn(8, 2)
    want = module.x0_hat(x_T, torch.tensor(100))
    assert torch.allclose(module.sample(8, "jump", 1, x_T=x_T), want)
    with pytest.raises(ValueError, match=r"algo.val_sampler='jump' on process='flow': jump reverses process=vp "
                                         r"\(Jump to the denoiser's x0 at every step.\); process='flow' samples with "
                                         r"euler \| heun"):
        module_with(mlp2d(), {"name": "flow", "num_steps": 10}, target="velocity", val_sampler="jump")


# ---------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("target", ["eps", "x0", "x_prev"])
def test_ve_loss_is_the_lectures_recipe(target):
    """Steps 1-4 of the lecture by hand, with the same random draws, give the module's loss."""
    torch.manual_seed(0)
    net = mlp2d(hidden=16, depth=1)
    module = module_with(net, {"name": "ve", "num_steps": 10, "sigma": 2.0}, target=target)
    x0 = torch.randn(32, 2)
    loss = module.loss(x0, torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    k = torch.randint(1, 11, (32,), generator=g)  # 2) t = k/T on the grid
    t, dt = k[:, None] / 10, 0.1
    x_prev = x0 + 2.0 * (t - dt).sqrt() * torch.randn(32, 2, generator=g)  # 3) x_{t-dt} = x0 + N(0, s^2(t-dt))
    x_t = x_prev + 2.0 * math.sqrt(dt) * torch.randn(32, 2, generator=g)  #    x_t = x_{t-dt} + N(0, s^2 dt)
    out = net(x_t, k.float())
    y = {"x_prev": x_prev, "x0": x0, "eps": (x_t - x0) / (2.0 * t.sqrt())}[target]
    pred = x_t + out if target == "x_prev" else out  # 4) squared loss on predicting the target
    assert loss.item() == pytest.approx(((pred - y) ** 2).mean().item(), rel=1e-5)


def test_vp_loss_is_ho_l_simple():
    torch.manual_seed(0)
    net = mlp2d(hidden=16, depth=1)
    module = module_with(net, {"name": "vp", "num_steps": 100})
    x0 = torch.randn(32, 2)
    loss = module.loss(x0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    k = torch.randint(1, 101, (32,), generator=g)
    eps = torch.randn(32, 2, generator=g)
    a = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 100, dtype=torch.float64), 0)[k - 1].float()[:, None]
    pred = net(a.sqrt() * x0 + (1 - a).sqrt() * eps, k - 1)  # eps_theta(sqrt(abar) x0 + sqrt(1 - abar) eps, t)
    assert loss.item() == pytest.approx(((eps - pred) ** 2).mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- bad input
def test_image_folder_errors_name_the_file(tmp_path):
    from PIL import Image

    from genlight.datamodules.images import ImageDataModule, load_image_folder

    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(d / f"{i}.png")
    x = load_image_folder(str(d), 3, 8)
    assert x.shape == (4, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match=r"0\.png: image has 3 channel\(s\).*data\.channels=1"):
        load_image_folder(str(d), 1, 8)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match=r"broken\.png: not a readable image"):
        load_image_folder(str(d), 3, 8)
    with pytest.raises(FileNotFoundError, match="data.path="):
        load_image_folder(str(tmp_path / "nope"), 3, 8)
    with pytest.raises(ValueError, match="data.source=digits: images are 1x8x8"):
        ImageDataModule(source="digits", channels=3)


def test_unknown_2d_dataset_is_named(cfg_factory):
    import hydra
    from hydra.errors import InstantiationException

    cfg = cfg_factory(*DQUICK, "data=toy2d", "data.name=spiral", quick=False)
    with pytest.raises(InstantiationException, match=r"data.name='spiral'.*gaussians8.*moons.*swiss_roll"):
        hydra.utils.instantiate(cfg.data)


def test_fd_needs_digit_shaped_images():
    from genlight.metrics import sample_metric

    with pytest.raises(ValueError, match="data.metric=fd .* 3x32x32"):
        sample_metric("fd", (3, 32, 32))


# ---------------------------------------------------------------------------------------------- runs
def _ema_weights(trainer):
    from genlight.callbacks import EMA

    (cb,) = [c for c in trainer.callbacks if isinstance(c, EMA)]
    return {k[len("module."):]: v.clone() for k, v in cb._average_model.state_dict().items() if k.startswith("module.")}


def test_checkpoint_state_dict_is_the_ema(cfg_factory, tmp_path):
    """The checkpoint's state_dict is the EMA (what test and sample.py use); the raw weights sit beside it.
    (Exact resume, EMA included, is tests/test_resume.py's.)"""
    from genlight.pipeline import train

    run = [*DQUICK, "data=toy2d", "data.n_train=2048", "data.n_val=200", "data.n_test=200", "data.batch_size=256",
           "trainer.val_check_interval=8", "algo.val_num_samples=100", "algo.test_num_samples=100", "test=false"]
    _, full = train(cfg_factory(*run, "trainer.max_steps=8", quick=False))
    ema = _ema_weights(full["trainer"])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 8
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(v, ema[k]), f"checkpoint state_dict is not the EMA at {k}"
    assert any(not torch.equal(ckpt["state_dict"][k], ckpt["current_model_state"][k]) for k in ckpt["state_dict"])


def test_digits_run_logs_images_to_wandb_and_sample_py_writes_a_grid(cfg_factory, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict
    from PIL import Image

    from genlight.pipeline import sample, train
    from tests.conftest import CONF
    from tests.helpers import leet as _leet

    cfg = cfg_factory(*DQUICK, "logger=wandb", "trainer.max_steps=6", "trainer.val_check_interval=3",
                      "algo.val_num_samples=40", "algo.test_num_samples=40", "algo.val_steps=5", "algo.test_steps=5",
                      "test=false", quick=False)
    metrics, _ = train(cfg)
    assert "val/fd" in metrics and "val/fd_ddim5" in metrics
    (run,) = list((tmp_path / "wandb").glob("offline-run-*"))
    history = [r["history"]["item"] for r in _leet(run, summary=False) if r["type"] == "history"]
    imgs = [h for h in history if h.get("val/samples._type") == "images/separated"]
    assert len(imgs) == 2, "a sample grid at each validation"
    assert [h["val/fd"] for h in history if "val/fd" in h]
    # explicit step axes and summaries (define_metric) reached the run
    defs = [r["metric"] for r in _leet(run, summary=False) if r["type"] == "metric"]
    named = {d["name"]: d for d in defs if "name" in d}
    assert named["val/fd"]["step_metric"] == "trainer/global_step" and named["val/fd"]["summary"] == {"min": True}
    assert named["train/loss"]["summary"] == {"min": True}
    assert {d["glob_name"] for d in defs if "glob_name" in d} >= {"train/*", "val/*", "test/*"}
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sweeps"))
    import dashboard

    keys = {k.split(".")[0] for k in set().union(*history)}  # media rows are flattened: "val/samples._type", ...
    assert dashboard.metrics("ddpm") - {"val/energy_distance"} <= keys, "every ddpm panel has data"
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["val_samples_step000003.png", "val_samples_step000006.png"]

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        scfg = compose("sample", overrides=[f"ckpt={tmp_path / 'checkpoints' / 'last.ckpt'}", "sampler=ddpm", "steps=10",
                                            "n=12", f"+out_dir={tmp_path}"])
    with open_dict(scfg):
        scfg.out = str(tmp_path / "grid.png")
    out = sample(scfg)
    x = torch.load(out.with_suffix(".pt"))
    assert x.shape == (12, 1, 8, 8) and x.abs().max() <= 1.0
    w, h = Image.open(out).size
    assert (w, h) == (4 * 34, 3 * 34)  # 12 images in a 4x3 grid, each enlarged 4x (32 px) in a 1-px frame
    with open_dict(scfg):
        scfg.label, scfg.guidance = 3, 2.0
    with pytest.raises(ValueError, match=r"label=3, guidance=2.0: this model is unconditional"):
        sample(scfg)  # guidance with an unconditional checkpoint
    with pytest.raises(FileNotFoundError, match="ckpt=.*nope.ckpt"):
        with open_dict(scfg):
            scfg.ckpt = str(tmp_path / "nope.ckpt")
        sample(scfg)


def _energy(x, ref):
    from genlight.metrics import EnergyDistance

    e = EnergyDistance()
    e.update(ref, real=True)
    e.update(x, real=False)
    return e.compute().item()


@pytest.mark.slow
@pytest.mark.parametrize("process", ["vp", "flow"])
def test_moons_learning_reaches_near_the_floor(cfg_factory, process):
    """About a minute of training on moons: the energy distance of DDIM-50 samples (flow: Euler-50) to held-out
    points drops from that of a standard Gaussian to within a few hundredths of it, next to the floor of fresh
    data."""
    from genlight.datamodules.toy2d import toy2d
    from genlight.pipeline import train

    metrics, objs = train(cfg_factory(*DQUICK, "data=toy2d", "trainer.max_steps=1500", "trainer.val_check_interval=1500",
                                      f"algo.process.name={process}", quick=False))
    ref = objs["datamodule"].splits["test"]
    floor = _energy(toy2d("moons", 1000, 7), ref)
    gauss = _energy(torch.randn(1000, 2, generator=torch.Generator().manual_seed(0)), ref)
    ed = metrics["test/energy_distance"].item()
    assert ed < gauss / 10 and ed < floor + 0.005, (ed, floor, gauss)


@pytest.mark.slow
def test_digits_learning_lowers_fd_clearly(cfg_factory):
    """A short digits run (600 steps) takes the FD of its samples from the hundreds to a few times the floor."""
    from genlight.datamodules.images import digits_split
    from genlight.metrics import sample_metric
    from genlight.pipeline import train

    cfg = cfg_factory(*DQUICK, "trainer.max_steps=600", "trainer.val_check_interval=600", "algo.val_num_samples=500",
                      "algo.test_num_samples=500", quick=False)
    metrics, objs = train(cfg)
    d = digits_split()
    fd = sample_metric("fd", (1, 8, 8))
    fd.update(d["val"], real=True)
    fd.update(d["train"][:500], real=False)
    floor = fd.compute().item()
    fd.reset()
    fd.update(d["val"], real=True)
    fd.update(torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, real=False)
    noise = fd.compute().item()
    got = metrics["test/fd"].item()
    assert got < noise / 5 and got < 6 * floor, (got, floor, noise)


# ---------------------------------------------------------------------------------------------- EMA warm-up
def test_ema_warmup_is_diffusers_ema_model_and_the_formula():
    """Our EMA update (AveragedModel + ema_multi_avg_fn) tracks diffusers' EMAModel step for step on the same
    weight trajectory; its decay is min(decay, (1 + n) / (10 + n)) after n updates, and plain decay without."""
    from diffusers.training_utils import EMAModel
    from torch.optim.swa_utils import AveragedModel

    from genlight.callbacks.ema import ema_decay, ema_multi_avg_fn

    assert [ema_decay(0.995, n, True) for n in (1, 2, 10, 1000, 2000)] == [2 / 11, 3 / 12, 11 / 20, 1001 / 1010, 0.995]
    assert ema_decay(0.995, 1, False) == 0.995
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    ours = AveragedModel(net, multi_avg_fn=ema_multi_avg_fn(0.995, True), use_buffers=True)
    theirs = EMAModel(net.parameters(), decay=0.995)
    for step in range(40):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ours.update_parameters(net)
        theirs.step(net.parameters())
        for a, b in zip(ours.module.parameters(), theirs.shadow_params):
            assert torch.allclose(a, b, atol=1e-6), f"update {step}"
    plain = AveragedModel(net, multi_avg_fn=ema_multi_avg_fn(0.995, False), use_buffers=True)
    plain.update_parameters(net)
    before = [p.clone() for p in plain.module.parameters()]
    with torch.no_grad():
        net.weight.add_(1.0)
    plain.update_parameters(net)  # without warm-up the second update moves 0.005 of the way
    assert torch.allclose(plain.module.weight, before[0] + 0.005, atol=1e-6)


# ---------------------------------------------------------------------------------------------- v-prediction
def test_v_target_closed_forms():
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho eq. in their sec. 4); x0 and eps are recovered
    exactly from (z_t, v): x0 = sqrt(abar) z - sqrt(1 - abar) v, eps = sqrt(1 - abar) z + sqrt(abar) v."""
    p = VPProcess(1000)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    k = torch.randint(1, 1001, (64,), generator=torch.Generator().manual_seed(1))
    z, v = p.training_pair(x0, k, "v", torch.Generator().manual_seed(2))
    eps = torch.randn(64, 2, generator=torch.Generator().manual_seed(2))
    a = p.abar[k].float()[:, None]
    assert torch.allclose(v, a.sqrt() * eps - (1 - a).sqrt() * x0, atol=1e-6)
    assert torch.allclose(z, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-6)
    assert torch.allclose(p.predict_x0(v, z, k, "v"), x0, atol=1e-5)
    assert torch.allclose((1 - a).sqrt() * z + a.sqrt() * v, eps, atol=1e-5)
    with pytest.raises(ValueError, match="algo.target='v' .* not defined for process='ve', which predicts eps | x0 | x_prev"):
        module_with(mlp2d(hidden=8, depth=1), {"name": "ve", "num_steps": 100}, target="v")


@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddpm", 50), ("ddim", 50)])
def test_v_prediction_samplers_equal_diffusers_schedulers(sampler, steps):
    """With a v-predicting network, whole trajectories equal diffusers' prediction_type="v_prediction" steps."""
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = dict(num_train_timesteps=1000, clip_sample=False, timestep_spacing="trailing", prediction_type="v_prediction")
    sched = DDPMScheduler(**kw) if sampler == "ddpm" else DDIMScheduler(set_alpha_to_one=True, **kw)
    sched.set_timesteps(steps)
    p = VPProcess(1000)
    grid = trailing_grid(1000, steps)
    x_ours = x_theirs = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, (k, s) in enumerate(zip(grid[:-1], grid[1:])):
        t = torch.tensor(k - 1)
        v = _fake_eps(x_theirs, t.expand(4))
        extra = {"generator": torch.Generator().manual_seed(i)} if sampler == "ddpm" else {"eta": 0.0}
        x_theirs = sched.step(v, t, x_theirs, **extra).prev_sample
        x0 = p.predict_x0(_fake_eps(x_ours, t.expand(4)), x_ours, torch.tensor(k), "v")
        if sampler == "ddpm":
            x_ours = p.ddpm_step(x_ours, x0, k, s, torch.randn(x_ours.shape, generator=torch.Generator().manual_seed(i)))
        else:
            x_ours = p.ddim_step(x_ours, x0, k, s)
        assert torch.allclose(x_ours, x_theirs, atol=1e-4, rtol=1e-4), f"step {k} -> {s}"


# ---------------------------------------------------------------------------------------------- min-SNR weighting
@pytest.mark.parametrize("target", ["eps", "v", "x0"])
def test_min_snr_loss_is_the_weighted_hand_computation(target):
    """Hang et al. 2023: the x0-space weight min(SNR, gamma) becomes min(SNR, gamma)/SNR for eps,
    min(SNR, gamma)/(SNR + 1) for v and min(SNR, gamma) for x0, on each example's mean squared error."""
    torch.manual_seed(0)
    net = mlp2d(hidden=16, depth=1)
    module = module_with(net, {"name": "vp", "num_steps": 100}, target=target, loss_weighting="min_snr", snr_gamma=5.0)
    x0 = torch.randn(64, 2)
    loss = module.loss(x0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    k = torch.randint(1, 101, (64,), generator=g)
    eps = torch.randn(64, 2, generator=g)
    a = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 100, dtype=torch.float64), 0)[k - 1]
    snr = a / (1 - a)
    w = {"eps": snr.clamp(max=5) / snr, "v": snr.clamp(max=5) / (snr + 1), "x0": snr.clamp(max=5)}[target].float()
    a = a.float()[:, None]
    y = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[target]
    pred = net(a.sqrt() * x0 + (1 - a).sqrt() * eps, k - 1)
    assert loss.item() == pytest.approx((w * ((y - pred) ** 2).mean(1)).mean().item(), rel=1e-5)
    assert w.min() < 0.99 and w.max() <= 5.0  # the clip bites somewhere on this batch (the test can fail)
    with pytest.raises(ValueError, match="algo.loss_weighting=min_snr"):
        module_with(net, {"name": "ve", "num_steps": 100}, target="x_prev", loss_weighting="min_snr")


# ---------------------------------------------------------------------------------------------- classifier-free guidance
def _conditional(process: str = "vp", **kw):
    from genlight.models.diffusion import mlp2d as mlp

    torch.manual_seed(0)
    return module_with(mlp(hidden=16, depth=1), {"name": process, "num_steps": 100}, class_conditional=True,
                       num_classes=3, **kw)


@pytest.mark.parametrize("process", ["vp", "flow"])
def test_guidance_is_the_ho_salimans_combination_and_labels_drop_to_null(process):
    target = "velocity" if process == "flow" else "eps"
    module = _conditional(process, cond_drop_prob=0.25, guidance_scale=2.0, target=target)
    assert module.net.class_emb.num_embeddings == 4, "3 classes and the null class"
    x, k = torch.randn(8, 2), torch.full((8,), 40)
    c = torch.arange(8) % 3
    cond, null = module.denoise(x, k, c), module.denoise(x, k, torch.full_like(c, 3))
    assert not torch.allclose(cond, null)
    assert torch.allclose(module.guided(x, k, c, 2.0), 3 * cond - 2 * null, atol=1e-6)
    assert torch.allclose(module.guided(x, k, c, 0.0), cond)
    seen = []
    real = module.denoise
    module.denoise = lambda x, k, labels=None: seen.append(labels) or real(x, k, labels)
    module.loss(torch.randn(4000, 2), torch.Generator().manual_seed(0), torch.zeros(4000, dtype=torch.long))
    assert (seen[0] == 3).float().mean().item() == pytest.approx(0.25, abs=0.03), "label dropout rate"
    assert set(seen[0].tolist()) == {0, 3}
    module.denoise = real
    x = module.sample(6, "heun" if process == "flow" else "ddim", 5, torch.Generator().manual_seed(0), labels=1)
    assert x.shape == (6, 2) and torch.isfinite(x).all()


def test_guidance_and_labels_fail_clearly():
    with pytest.raises(ValueError, match=r"label=3: outside the model's classes 0\.\.2"):
        _conditional().sample(4, "ddim", 5, labels=3)
    plain = module_with(mlp2d(hidden=8, depth=1), {"name": "vp", "num_steps": 100})
    with pytest.raises(ValueError, match=r"this model is unconditional .* algo.class_conditional=true"):
        plain.sample(4, "ddim", 5, labels=1, guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"algo.guidance_scale=2.0 needs a class-conditional model"):
        module_with(mlp2d(hidden=8, depth=1), {"name": "vp", "num_steps": 100}, guidance_scale=2.0)


def test_conditional_training_on_unlabelled_data_names_the_key(cfg_factory, tmp_path):
    from PIL import Image

    from genlight.pipeline import train

    cfg = cfg_factory(*DQUICK, "data=toy2d", "algo.class_conditional=true", quick=False)
    with pytest.raises(Exception, match=r"algo.class_conditional=true needs labelled data.*data.num_classes"):
        train(cfg)
    d = tmp_path / "flat"
    d.mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / f"{i}.png")
    cfg = cfg_factory(*DQUICK, "data=images", f"data.path={d}", "data.image_size=8", "data.num_classes=2",
                      "algo.class_conditional=true", quick=False)
    with pytest.raises(ValueError, match=r"0\.png is not in a class sub-folder of data.path"):
        train(cfg)


# ---------------------------------------------------------------------------------------------- 32x32 RGB
def _shapes(root: Path, n: int = 24) -> None:
    """Coloured shapes on a dark background, one sub-folder per class (circle, square)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.RandomState(0)
    for name in ("circle", "square"):
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = Image.new("RGB", (32, 32), tuple(int(c) for c in rng.randint(0, 60, 3)))
            x, y, r = rng.randint(9, 23), rng.randint(9, 23), rng.randint(5, 9)
            draw = getattr(ImageDraw.Draw(img), "ellipse" if name == "circle" else "rectangle")
            draw([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.randint(120, 256, 3)))
            img.save(root / name / f"{i}.png")


def test_rgb_32x32_conditional_run_in_bf16_lowers_the_loss_and_writes_a_grid(cfg_factory, tmp_path):
    import lightning as L
    from PIL import Image

    from tests.helpers import train_with

    _shapes(tmp_path / "shapes")

    class Record(L.Callback):
        losses, dtypes = [], set()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

        def on_train_start(self, trainer, module):
            module.net.conv_in.register_forward_hook(lambda m, i, o: self.dtypes.add(o.dtype))

    rec = Record()
    cfg = cfg_factory(*DQUICK, "data=images", f"data.path={tmp_path / 'shapes'}", "algo.class_conditional=true",
                      "data.num_classes=2", "trainer.precision=bf16-mixed", "trainer.max_steps=40",
                      "trainer.val_check_interval=40", "data.batch_size=16", "algo.lr=2e-3", "algo.warmup_steps=5",
                      "algo.val_num_samples=8", "algo.val_steps=10", "algo.guidance_scale=1.0", "test=false",
                      quick=False)
    _, objs = train_with(cfg, rec)
    assert objs["module"].net.config["sample_size"] == 32 and objs["module"].net.config["num_class_embeds"] == 3
    assert torch.bfloat16 in rec.dtypes, "the UNet did not run under bf16 autocast"
    first, last = sum(rec.losses[:8]) / 8, sum(rec.losses[-8:]) / 8
    assert last < 0.7 * first, (first, last)
    (grid,) = (tmp_path / "samples").glob("val_samples_step*.png")
    assert Image.open(grid).mode == "RGB" and Image.open(grid).size[0] >= 4 * 32


@pytest.mark.slow
def test_class_conditional_digits_draw_the_class_asked_for(cfg_factory):
    """300 class-conditional steps: samples of each requested digit are classified as that digit far above
    chance (0.1), and guidance (w = 2) raises that share further, at a cost in diversity the FD shows."""
    from genlight.pipeline import train

    cfg = cfg_factory(*DQUICK, "algo.class_conditional=true", "trainer.max_steps=300", "trainer.val_check_interval=300",
                      "algo.val_num_samples=500", "test=false", quick=False)
    metrics, objs = train(cfg)
    assert metrics["val/class_accuracy"] > 0.6, metrics["val/class_accuracy"]
    module = objs["module"]
    labels = torch.arange(500) % 10
    from genlight.metrics import class_accuracy

    x = module.sample(500, "ddim", 50, torch.Generator().manual_seed(0), labels=labels, guidance_scale=2.0)
    assert class_accuracy(x, labels) > metrics["val/class_accuracy"] + 0.03


# ---------------------------------------------------------------------------------------------- flow matching
class FlowOracle(torch.nn.Module):
    """The exact posterior means of x_t = (1 - t) x0 + t eps for Gaussian data N(m, v), as the network for `target`:
    E[eps - x0 | x_t] (velocity), E[eps | x_t] or E[x0 | x_t]; plus N(0, noise^2) per output, a network's error."""

    def __init__(self, m: float, v: float, T: int = 1000, target: str = "velocity", noise: float = 0.0):
        super().__init__()
        self.m, self.v, self.T, self.target, self.noise = m, v, T, target, noise
        self.g = torch.Generator().manual_seed(123)
        self.config = {"dim": 1}

    def forward(self, x, timestep):
        t = (timestep.double() / self.T)[:, None]
        var = (1 - t) ** 2 * self.v + t**2  # Var x_t
        centred = x.double() - (1 - t) * self.m
        x0 = self.m + (1 - t) * self.v / var * centred  # Cov(x0, x_t) / Var x_t = (1 - t) v / var
        eps = t / var * centred  # Cov(eps, x_t) / Var x_t = t / var
        out = {"velocity": eps - x0, "eps": eps, "x0": x0}[self.target]
        return (out + self.noise * torch.randn(out.shape, generator=self.g, dtype=out.dtype)).float()


def test_flow_training_pair_and_its_parametrisations():
    """x_t = (1 - t) x0 + t eps; the velocity target is eps - x0; x0 read back from a velocity or an x0 output is x0
    (an eps output is refused, naming why); logit-normal t has the median 1/2 and the spread of sigmoid(N(0, 1))."""
    p = FlowProcess(num_steps=1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 2, generator=g)
    k = p.sample_k(64, g)
    assert k.dtype.is_floating_point and 0 <= k.min() and k.max() < 1000
    x_t, v = p.training_pair(x0, k, "velocity", torch.Generator().manual_seed(1))
    eps = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    t = (k / 1000)[:, None]
    assert torch.allclose(x_t, (1 - t) * x0 + t * eps, atol=1e-6) and torch.allclose(v, eps - x0, atol=1e-6)
    for target, out in (("velocity", eps - x0), ("x0", x0)):
        assert torch.allclose(p.predict_x0(out, x_t, k, target), x0, atol=1e-6), target
    with pytest.raises(ValueError, match="algo.target='eps' with algo.process.name=flow"):
        p.predict_x0(eps, x_t, k, "eps")
    ln = FlowProcess(t_sampling="logit_normal").sample_k(200_000, torch.Generator().manual_seed(2)) / 1000
    assert ln.median().item() == pytest.approx(0.5, abs=0.01)
    assert torch.logit(ln).std().item() == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_step_equals_diffusers_flow_match_euler(shift):
    """One Euler step x_s = x_t + (s - t) v equals diffusers' FlowMatchEulerDiscreteScheduler.step on the same
    inputs, at each of its (shifted) sigmas; the even grid (the default) is the same time shift of an even grid from 1
    to 0, which is not diffusers' grid (test_flow_diffusers_grid_is_flow_match_euler_schedulers_sigmas)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(10)
    p = FlowProcess(num_steps=1000, shift=shift)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g)
    for i, timestep in enumerate(sched.timesteps):
        out = torch.randn(x.shape, generator=g)  # a velocity prediction
        theirs = sched.step(out, timestep, x).prev_sample
        k, s = sched.sigmas[i].item() * 1000, sched.sigmas[i + 1].item() * 1000
        ours = p.ddim_step(x, p.predict_x0(out, x, torch.tensor(k), "velocity"), k, s)
        assert torch.allclose(ours, theirs, atol=1e-5), i
        x = theirs
    t = torch.linspace(1, 0, 11, dtype=torch.float64)
    assert p.grid(10) == pytest.approx((shift * t / (1 + (shift - 1) * t) * 1000).tolist())
    assert p.grid(10)[0] == 1000 and p.grid(10)[-1] == 0 and (shift == 1 or p.grid(10)[5] > 500)


@pytest.mark.parametrize("steps, shift", [(10, 3.0), (10, 1.0), (4, 3.0), (20, 3.0), (50, 1.0), (1, 2.0), (7, 0.5)])
def test_flow_diffusers_grid_is_flow_match_euler_schedulers_sigmas(steps, shift):
    """algo.flow_grid=diffusers visits exactly the sigmas of diffusers' FlowMatchEulerDiscreteScheduler (default
    settings, set_timesteps(steps)), last 0 included, for any (steps, shift); the even grid is another grid: at 10
    steps and shift 3 its last step starts at 0.25, diffusers' at 0.0089."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    grid = FlowProcess(num_steps=1000, shift=shift, flow_grid="diffusers").grid(steps)
    assert torch.equal((torch.tensor(grid, dtype=torch.float64) / 1000).float(), sched.sigmas)
    # and whole Euler trajectories of a velocity network agree with diffusers' loop over its timesteps
    net = FlowOracle(0.7, 0.09)
    module = module_with(net, {"name": "flow", "num_steps": 1000}, target="velocity", shift=shift, flow_grid="diffusers")
    x = torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
    ours = module.sample(64, "euler", steps, x_T=x, shape=(1,))
    for timestep in sched.timesteps:
        x = sched.step(net(x, timestep.expand(64)), timestep, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-5)
    if (steps, shift) == (10, 3.0):
        assert sched.sigmas[-2].item() == pytest.approx(0.00893, abs=1e-5)
        assert FlowProcess(num_steps=1000, shift=shift).grid(steps)[-2] == pytest.approx(250.0)


def test_flow_euler_and_heun_transport_the_prior_to_gaussian_data():
    """With the exact velocity of Gaussian data N(m, v), the flow maps x_1 to m + sqrt(v) x_1 (the monotone map):
    Euler's error falls as 1/steps, Heun's as 1/steps^2, and Heun is closer at equal network evaluations."""
    m, v = 0.7, 0.09
    module = module_with(FlowOracle(m, v), {"name": "flow", "num_steps": 1000}, target="velocity")
    x1 = torch.randn(2000, 1, generator=torch.Generator().manual_seed(0))
    exact = m + math.sqrt(v) * x1

    def err(sampler, steps):
        return (module.sample(2000, sampler, steps, x_T=x1, shape=(1,)) - exact).abs().max().item()

    euler = {n: err("euler", n) for n in (10, 20, 40, 200)}
    heun = {n: err("heun", n) for n in (10, 40)}
    assert euler[200] < 0.02 and heun[40] < 0.005
    assert 3 < euler[10] / euler[40] < 5  # first order: 4x steps, 4x less error (measured 3.8)
    assert heun[10] / heun[40] > 10  # second order: 16x less (measured 17.6)
    assert heun[10] < euler[20] / 1.5  # at equal network evaluations (19 against 20): measured 0.059 against 0.113
    module.sample(4, "heun", 5, x_T=x1[:4], shape=(1,))  # heun's last step is Euler: 2 x 5 - 1 evaluations
    calls = []
    module.net.register_forward_hook(lambda *a: calls.append(1))
    module.sample(4, "heun", 5, x_T=x1[:4], shape=(1,))
    assert len(calls) == 9


@pytest.mark.parametrize("target", FlowProcess.targets)
def test_every_flow_target_samples_the_same_distribution(target):
    """Each target the flow accepts, from a network that is the exact posterior mean of N(m, s^2) data plus 0.01
    noise, samples N(m, s^2) with Euler and Heun, and its x0 estimate stays in the data's range at every step,
    t = 1 included (where x_t is pure noise and E[x0 | x_t] = m)."""
    m, s = 2.0, 0.5
    module = module_with(FlowOracle(m, s**2, target=target, noise=0.01), {"name": "flow", "num_steps": 1000},
                         target=target)
    x1 = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0))
    x0_hats = []
    predict_x0 = module.process.predict_x0

    def recording(out, x_t, k, target):
        x0_hats.append(predict_x0(out, x_t, k, target))
        return x0_hats[-1]

    module.process.predict_x0 = recording
    for sampler, steps in (("euler", 50), ("heun", 10)):
        x0_hats.clear()
        x = module.sample(4000, sampler, steps, x_T=x1, shape=(1,))
        assert x.mean().item() == pytest.approx(m, abs=0.03), (sampler, x.mean().item())
        assert x.std().item() == pytest.approx(s, abs=0.03), (sampler, x.std().item())
        worst = max(h.abs().max().item() for h in x0_hats)
        assert worst < m + 5 * s, (sampler, worst)


@pytest.mark.parametrize("kwargs, message", [
    ({"process": {"name": "vp", "num_steps": 10}, "target": "velocity"}, "algo.target='velocity' .* not defined for process='vp'"),
    ({"process": {"name": "flow", "num_steps": 10}, "target": "v"}, "algo.target='v' .* not defined for process='flow', which predicts velocity"),
    ({"process": {"name": "flow", "num_steps": 10}, "target": "eps"}, "algo.target='eps' with algo.process.name=flow: "
     "sampling starts at t = 1, where x_t = eps, so an eps prediction carries no information on x0 .* divides by zero "
     r".* use algo.target=velocity or algo.target=x0"),
    ({"process": {"name": "vp", "num_steps": 10}, "val_sampler": "heun"}, "algo.val_sampler='heun' on process='vp': heun reverses process=flow .* samples with ddpm [|] ddim [|] dpmpp"),
    ({"process": {"name": "flow", "num_steps": 10}, "val_sampler": "ddpm"}, "process='flow' samples with euler [|] heun"),
    ({"process": {"name": "flow", "num_steps": 10}, "shift": 0.0}, "algo.shift=0.0: must be > 0"),
    ({"process": {"name": "flow", "num_steps": 10}, "t_sampling": "beta"}, "algo.t_sampling='beta'"),
    ({"process": {"name": "vp", "num_steps": 10}, "shift": 3.0}, "algo.shift=3.0: it shapes the time of process=flow; process='vp'"),
    ({"process": {"name": "flow", "num_steps": 10}, "flow_grid": "karras"}, r"algo.flow_grid='karras': must be one of \['even', 'diffusers'\]"),
    ({"process": {"name": "vp", "num_steps": 10}, "flow_grid": "diffusers"}, "algo.flow_grid='diffusers': it shapes the time of process=flow; process='vp'"),
])
def test_flow_bad_options_stop_naming_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DDPMModule(net=mlp2d(), clip_x0=None, val_steps=5, test_steps=5, **kwargs)


def test_dpm_solver_on_vp_converges_at_second_order():
    """sampler=dpmpp (diffusers' DPM-Solver++ 2M on our betas and prediction type): with the exact denoiser of
    Gaussian data the probability-flow ODE maps x_T affinely onto the data (the monotone map between the two
    Gaussians); DPM-Solver++'s error falls as 1/steps^2 (measured 31x from 40 to 100 steps) where DDIM's falls as
    1/steps (2.4x), and 100 of its evaluations beat 1000 of DDIM's; a ve model refuses it."""
    m, v = 0.7, 0.09
    module = module_with(Oracle(VPProcess(1000), m, v), {"name": "vp", "num_steps": 1000}, target="x0")
    x1 = torch.randn(2000, 1, generator=torch.Generator().manual_seed(0))
    a = module.process.abar[1000].item()
    exact = m + math.sqrt(v / (a * v + 1 - a)) * (x1 - math.sqrt(a) * m)

    def err(sampler, steps):
        return (module.sample(2000, sampler, steps, x_T=x1, shape=(1,)) - exact).abs().max().item()

    dpm = {n: err("dpmpp", n) for n in (40, 100)}
    ddim = {n: err("ddim", n) for n in (40, 100, 1000)}
    assert 2 < ddim[40] / ddim[100] < 3
    assert dpm[40] / dpm[100] > 10
    assert dpm[100] < ddim[1000] / 2
    with pytest.raises(ValueError, match="algo.val_sampler='dpmpp' on process='ve': dpmpp reverses process=vp"):
        module_with(mlp2d(), {"name": "ve", "num_steps": 10}, val_sampler="dpmpp")


def test_a_flow_run_records_the_target_and_samplers_it_used(cfg_factory, tmp_path):
    """algo.target / val_sampler / test_sampler left null are the process's own (flow: velocity, euler): hparams.yaml
    (and so the W&B config, from the same record) and the checkpoint hold those values, not null."""
    import yaml

    from genlight.pipeline import train

    run = [*DQUICK, "data=toy2d", "data.n_train=512", "data.n_val=100", "data.n_test=100", "data.batch_size=256",
           "algo.process.name=flow", "trainer.max_steps=2", "trainer.val_check_interval=2", "algo.val_num_samples=50",
           "test=false", "logger=csv"]
    cfg = cfg_factory(*run, quick=False)
    assert cfg.algo.target is None and cfg.algo.val_sampler is None
    train(cfg)
    want = {"target": "velocity", "val_sampler": "euler", "test_sampler": "euler"}
    (hparams,) = tmp_path.glob("csv/version_*/hparams.yaml")
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    for algo in (yaml.safe_load(hparams.read_text())["algo"], ckpt):
        assert {k: algo[k] for k in want} == want
