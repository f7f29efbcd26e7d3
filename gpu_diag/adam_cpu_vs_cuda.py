"""GPU diagnosis: how far apart do torch's CUDA and CPU fused AdamW put TinyGPT in a few steps
(same gradients, clipping at 0.5)? And the overlap paths with/without streamed host groups."""
import torch
from tests.engine_models import TinyGPT, engine_config
from tests.test_engine import batches

torch.manual_seed(0)
a = TinyGPT().cuda()
b = TinyGPT().cuda()
b.load_state_dict(a.state_dict())
kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
opt_a = torch.optim.AdamW(a.parameters(), **kw)
cpu_params = [p.detach().cpu().clone().requires_grad_(True) for p in b.parameters()]
opt_b = torch.optim.AdamW(cpu_params, **kw)
for step, (x, y) in enumerate(batches("gpt", 8)):
    for m, o in ((a, opt_a), (b, None)):
        m.zero_grad()
        m(x, y).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
    opt_a.step()
    for p, c in zip(b.parameters(), cpu_params):
        c.grad = p.grad.cpu()
    opt_b.step()
    with torch.no_grad():
        for p, c in zip(b.parameters(), cpu_params):
            p.copy_(c)
    diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    print(f"step {step}: CUDA vs CPU AdamW, max |weight diff| {diff:.3g}")

from tests.test_overlap import MAX_NORM
from tests.test_engine_speed import _split_limit, _train
limit = _split_limit()
for stream in (True, False):
    cfg = engine_config(device_memory_limit=limit, gradient_clipping=MAX_NORM, stream_host_optimizer=stream)
    r1 = _train(cfg, 8, overlap=True)
    r2 = _train(cfg, 8, overlap=False)
    r3 = _train(cfg, 8, overlap=True)
    eq = lambda u, v: u[0] == v[0] and all(torch.equal(s, t) for s, t in zip(u[1], v[1]))
    print("stream", stream, "overlap==step:", eq(r1, r2), "overlap twice equal:", eq(r1, r3),
          "streamed last step:", r1[2].chunk_stats()["step_host_groups_streamed"], r2[2].chunk_stats()["step_host_groups_streamed"],
          "host groups:", sum(1 for g in r1[2]._rt.groups if not g.optimizer_on_device))
