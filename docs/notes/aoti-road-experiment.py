import time, torch, os
from torch import nn
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(64,128), nn.GELU(), nn.Linear(128,64)).eval()
names = [n for n,_ in m.named_parameters()]
params = [p.detach() for _,p in m.named_parameters()]
class Fwd(nn.Module):
    def forward(self, x, *ps):
        return functional_call(m, dict(zip(names, ps)), (x,))
def joint(x, g, *ps):
    x = x.detach().requires_grad_(True)
    ps = [p.detach().requires_grad_(True) for p in ps]
    with torch.enable_grad():
        out = functional_call(m, dict(zip(names, ps)), (x,))
        return torch.autograd.grad(out, [x, *ps], g)
x = torch.randn(8,64); g = torch.randn(8,64)
B = torch.export.Dim("batch", min=1, max=4096)
t=time.time()
ep = torch.export.export(Fwd(), (x, *params), dynamic_shapes=({0:B}, tuple([None]*len(params))))
print("export fwd", time.time()-t)
t=time.time()
gm = make_fx(joint, tracing_mode="symbolic")(x, g, *params)
print("make_fx joint", time.time()-t)
print(gm.code[:1500])
class Bwd(nn.Module):
    def __init__(s): super().__init__(); s.gm = gm
    def forward(s, x, g, *ps): return tuple(s.gm(x, g, *ps))
t=time.time()
epb = torch.export.export(Bwd(), (x, g, *params), dynamic_shapes=({0:B},{0:B},tuple([None]*len(params))))
print("export bwd", time.time()-t)
t=time.time()
p1 = torch._inductor.aoti_compile_and_package(ep, package_path="/tmp/exp/fwd.pt2")
print("aoti fwd", time.time()-t)
t=time.time()
p2 = torch._inductor.aoti_compile_and_package(epb, package_path="/tmp/exp/bwd.pt2")
print("aoti bwd", time.time()-t)
import time, torch, zipfile
t=time.time()
from torch._inductor import aoti_load_package
print("import", time.time()-t)
for p in ["/tmp/exp/fwd.pt2","/tmp/exp/bwd.pt2"]:
    print([ (i.filename, i.file_size) for i in zipfile.ZipFile(p).infolist()])
t=time.time(); f = aoti_load_package("/tmp/exp/fwd.pt2"); print("load fwd", time.time()-t)
t=time.time(); b = aoti_load_package("/tmp/exp/bwd.pt2"); print("load bwd", time.time()-t)
torch.manual_seed(0)
from torch import nn
m = nn.Sequential(nn.Linear(64,128), nn.GELU(), nn.Linear(128,64))
ps=[p.detach() for p in m.parameters()]
for bs in [1,3,8,64]:
    x=torch.randn(bs,64); g=torch.randn(bs,64)
    out=f(x,*ps) if False else f(x, ps)
    print(bs, (out-m(x)).abs().max().item() if isinstance(out, torch.Tensor) else type(out))
    gr=b(x,g,ps)
    xx=x.clone().requires_grad_(); o=m(xx); o.backward(g)
    print(" grads", (gr[0]-xx.grad).abs().max().item(), (gr[1]-m[0].weight.grad).abs().max().item())
    m.zero_grad()
import timeit
x=torch.randn(32,64)
print("eager", timeit.timeit(lambda: m(x), number=2000)/2000*1e6, "aoti", timeit.timeit(lambda: f(x,ps), number=2000)/2000*1e6)
