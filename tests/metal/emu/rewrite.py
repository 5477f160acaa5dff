"""Source rewrite of a .metal file into C++ for the emulation.

Only what one macro cannot do is rewritten; every line keeps its number and
a `#line` directive names the .metal file, so compiler errors point at the
kernel source:

* `threadgroup T x[N];` at the start of a statement declares shared storage:
  it becomes `static threadgroup T x[N];` (the macro `threadgroup` then
  qualifies the static, or the pointer in a parameter).
* `[[kernel]]` and the attributes of kernel parameters are removed, after
  being read: in run mode a launcher struct `emu_kernel_<name>` is appended
  to the kernel's closing line. It binds each `[[buffer(n)]]` parameter to
  buffer n of the dispatch and each thread-position attribute to the
  calling thread's value, and lists the buffer indices the kernel declares.
"""

import re

THREAD_ATTRS = {
    "thread_position_in_grid",
    "threadgroup_position_in_grid",
    "thread_position_in_threadgroup",
    "thread_index_in_threadgroup",
    "thread_index_in_simdgroup",
    "simdgroup_index_in_threadgroup",
    "threads_per_threadgroup",
    "threadgroups_per_grid",
}

_ATTR = re.compile(r"\[\[\s*(\w+)\s*(?:\(([^)]*)\))?\s*\]\]")
_KERNEL = re.compile(r"\[\[\s*kernel\s*\]\]\s*void\s+(\w+)\s*\(")
_TG_DECL = re.compile(r"^(\s*)(threadgroup\s+[^*&;]*\[[^;]*;)", re.M)


class RewriteError(Exception):
    pass


def _skip_code(text, i, open_ch, close_ch):
    """Index just past the bracket closing the one at text[i]."""
    depth = 0
    n = len(text)
    while i < n:
        if text.startswith("//", i):
            i = text.find("\n", i)
            if i < 0:
                return n
            continue
        if text.startswith("/*", i):
            i = text.find("*/", i) + 2
            continue
        c = text[i]
        if c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise RewriteError(f"unbalanced {open_ch}{close_ch}")


def _split_params(text):
    params, depth, cur = [], 0, ""
    for c in text:
        if c in "<([":
            depth += 1
        elif c in ">)]":
            depth -= 1
        if c == "," and depth == 0:
            params.append(cur)
            cur = ""
        else:
            cur += c
    if cur.strip():
        params.append(cur)
    return params


def _line_of(text, i):
    return text.count("\n", 0, i) + 1


def _launcher(name, template_params, params, line):
    args, buffers = [], []
    for p in params:
        attrs = _ATTR.findall(p)
        decl = " ".join(_ATTR.sub(" ", p).split())
        m = re.search(r"(\w+)\s*$", decl)
        if not attrs or not m:
            raise RewriteError(
                f"line {line}: kernel {name}: parameter '{decl}' has no "
                "attribute"
            )
        ptype = decl[: m.start()].strip()
        attr, arg = attrs[0]
        if attr == "buffer":
            buffers.append(arg.strip())
            if ptype.endswith("&"):
                args.append(f"*({ptype[:-1]}*)::emu::buffer(g, {arg})")
            else:
                args.append(f"({ptype})::emu::buffer(g, {arg})")
        elif attr in THREAD_ATTRS:
            args.append(f"::emu::attr<{ptype}>(::emu::{attr})")
        else:
            raise RewriteError(
                f"line {line}: kernel {name}: unsupported attribute [[{attr}]]"
            )
    tparams = ", ".join(template_params)
    targs = ", ".join(re.search(r"(\w+)\s*$", t).group(1) for t in template_params)
    return (
        f" template <{tparams}> struct emu_kernel_{name} {{"
        f" static void launch(::emu::Group& g) {{ {name}<{targs}>({', '.join(args)}); }}"
        f" static std::vector<int> buffers() {{ return {{{', '.join(buffers)}}}; }} }};"
    )


def kernels(text):
    """(name, template params, params, end of body) for each kernel."""
    found = []
    for m in _KERNEL.finditer(text):
        name = m.group(1)
        before = text[: m.start()].rstrip()
        t = re.search(r"template\s*<([^>]*)>\s*$", before)
        if not t:
            raise RewriteError(
                f"line {_line_of(text, m.start())}: kernel {name} is not a "
                "template (instantiate it with instantiate_kernel)"
            )
        tparams = [x.strip() for x in t.group(1).split(",")]
        open_paren = m.end() - 1
        close = _skip_code(text, open_paren, "(", ")")
        params = _split_params(text[open_paren + 1 : close - 1])
        body = text.index("{", close)
        end = _skip_code(text, body, "{", "}")
        found.append((name, tparams, params, end, _line_of(text, m.start())))
    return found


def rewrite(text, path, mode):
    """C++ source for `mode` 'run' or 'lint' from the .metal `text`."""
    inserts = []
    if mode == "run":
        for name, tparams, params, end, line in kernels(text):
            inserts.append((end, _launcher(name, tparams, params, line)))
    for pos, add in sorted(inserts, reverse=True):
        text = text[:pos] + add + text[pos:]
    text = _TG_DECL.sub(r"\1static \2", text)
    text = re.sub(r"\[\[\s*kernel\s*\]\]", "", text)
    text = _ATTR.sub("", text)
    return f'#line 1 "{path}"\n' + text
