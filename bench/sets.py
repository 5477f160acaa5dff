"""The parameter sets the benchmark steps: shapes only, built on demand.

Each set is a flat dict ``{parameter path: shape}``; ``build`` turns it into
parameter and gradient trees of one dtype.
"""

import mlx.core as mx

SWEEP_SIZES = (256, 512, 1024, 2048, 4096, 8192)


def gpt2_small():
    """GPT-2 small (124M values, 148 tensors), Hugging Face layout."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes = {"wte": (vocab, d), "wpe": (ctx, d)}
    for i in range(layers):
        h = f"h.{i}."
        shapes.update({
            h + "ln_1.weight": (d,),
            h + "ln_1.bias": (d,),
            h + "attn.c_attn.weight": (d, 3 * d),
            h + "attn.c_attn.bias": (3 * d,),
            h + "attn.c_proj.weight": (d, d),
            h + "attn.c_proj.bias": (d,),
            h + "ln_2.weight": (d,),
            h + "ln_2.bias": (d,),
            h + "mlp.c_fc.weight": (d, 4 * d),
            h + "mlp.c_fc.bias": (4 * d,),
            h + "mlp.c_proj.weight": (4 * d, d),
            h + "mlp.c_proj.bias": (d,),
        })
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return shapes


def llama_style():
    """A Llama-style decoder of ~291M values: d=1024, 20 layers, 16 query and
    4 key/value heads, SwiGLU width 2816, vocabulary 32000, untied head,
    RMSNorm weights only (183 tensors)."""
    d, vocab, layers, ffn, kv = 1024, 32000, 20, 2816, 256
    shapes = {"embed_tokens.weight": (vocab, d)}
    for i in range(layers):
        h = f"layers.{i}."
        shapes.update({
            h + "input_layernorm.weight": (d,),
            h + "self_attn.q_proj.weight": (d, d),
            h + "self_attn.k_proj.weight": (kv, d),
            h + "self_attn.v_proj.weight": (kv, d),
            h + "self_attn.o_proj.weight": (d, d),
            h + "post_attention_layernorm.weight": (d,),
            h + "mlp.gate_proj.weight": (ffn, d),
            h + "mlp.up_proj.weight": (ffn, d),
            h + "mlp.down_proj.weight": (d, ffn),
        })
    shapes.update({"norm.weight": (d,), "lm_head.weight": (vocab, d)})
    return shapes


def matrix(n):
    """One n x n matrix (factored statistics)."""
    return {"w": (n, n)}


def many_1k():
    """1000 vectors of 1024 values (unfactored statistics, like biases)."""
    return {f"v{i}": (1024,) for i in range(1000)}


def many_256():
    """10 000 matrices of 16 x 16 = 256 values (factored statistics)."""
    return {f"m{i}": (16, 16) for i in range(10000)}


def tiny():
    """A few small tensors of every kind, for the tests."""
    return {"w": (64, 32), "b": (32,), "stack": (4, 16, 8), "v": (33,)}


NAMED = {
    "gpt2": ("GPT-2 small", gpt2_small),
    "llama": ("Llama-style ~291M", llama_style),
    "many-1k": ("1000 x 1K vectors", many_1k),
    "many-256": ("10000 x 256 (16x16)", many_256),
    "tiny": ("tiny (tests)", tiny),
}

DEFAULT_SETS = ("gpt2", "many-1k", "sweep", "many-256", "llama")
QUICK_SETS = ("sweep", "many-1k")
QUICK_SWEEP_SIZES = (256, 512, 1024, 2048)


def resolve(names, sweep_sizes):
    """Expand set names ("sweep" into one set per size) into a list of
    ``(key, label, shapes)``."""
    out = []
    for name in names:
        if name == "sweep":
            for n in sweep_sizes:
                out.append((f"matrix-{n}", f"{n}x{n} matrix", matrix(n)))
        elif name.startswith("matrix-"):
            n = int(name.split("-", 1)[1])
            out.append((name, f"{n}x{n} matrix", matrix(n)))
        elif name in NAMED:
            label, fn = NAMED[name]
            out.append((name, label, fn()))
        else:
            choices = ", ".join(["sweep", "matrix-N", *NAMED])
            raise SystemExit(f"bench: unknown set '{name}' (choose from {choices})")
    return out


def num_values(shapes):
    total = 0
    for shape in shapes.values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def build(shapes, dtype, seed=0):
    """Parameters ~ N(0, 0.02) and gradients ~ N(0, 1e-3) of ``dtype``, as
    flat dicts (a valid MLX tree), evaluated one tensor at a time."""
    params, grads = {}, {}
    for i, (name, shape) in enumerate(shapes.items()):
        kp, kg = mx.random.split(mx.random.key(seed * 1_000_003 + i))
        params[name] = mx.random.normal(shape, dtype=dtype, scale=0.02, key=kp)
        grads[name] = mx.random.normal(shape, dtype=dtype, scale=1e-3, key=kg)
        mx.eval(params[name], grads[name])
    return params, grads
