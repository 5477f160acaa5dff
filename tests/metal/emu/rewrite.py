"""Source rewrite of the kernel source into C++ for the emulation.

The input is the flattened source the package ships (cmake/embed_metal.py),
whose `#line` directives name the .metal files. Only what one macro cannot
do is rewritten, and every line keeps its number, so compiler errors and
sanitizer reports point at the kernel source:

* The emulator's prelude (include/emu_prelude.h) is included first.
* `threadgroup T x[N];` at the start of a statement declares storage shared
  by the threads of a threadgroup. In run mode it becomes a reference to
  the running group's copy, `threadgroup T (&x)[N] = ::emu::shared<T[N]>(id)`
  (per group, so that concurrent dispatches do not share it); in lint mode
  `static threadgroup T x[N];` (a local in an address space must be static
  for clang).
* `[[kernel]]` and the attributes of kernel parameters are removed, after
  being read: in run mode a launcher struct `emu_kernel_<name>` is appended
  to the kernel's closing line. It binds each `[[buffer(n)]]` parameter to
  buffer n of the dispatch and each thread-position attribute to the
  calling thread's value, runs the kernel and then its end (an arrival at
  the barriers, emu::kernel_end), and lists the buffer indices and the
  threadgroup memory the kernel declares.
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
_TG_PARTS = re.compile(r"threadgroup\s+([\w:<>, ]+?)\s+(\w+)\s*((?:\[[^\]]+\])+)\s*;")


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


def _tg_parts(decl, line):
    m = _TG_PARTS.match(decl.strip())
    if not m:
        raise RewriteError(f"line {line}: cannot read the declaration '{decl}'")
    return m.group(1), m.group(2), m.group(3)


def _launcher(name, template_params, params, line, tg_types):
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
    tg_bytes = " + ".join(f"sizeof({x})" for x in tg_types) or "0"
    return (
        f" template <{tparams}> struct emu_kernel_{name} {{"
        f" static void launch(::emu::Group& g) {{ {name}<{targs}>({', '.join(args)});"
        f" ::emu::kernel_end(); }}"
        f" static std::vector<int> buffers() {{ return {{{', '.join(buffers)}}}; }}"
        f" static size_t threadgroup_bytes() {{ return {tg_bytes}; }} }};"
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
        tg_types = []
        for d in _TG_DECL.finditer(text, body, end):
            ty, _, dims = _tg_parts(d.group(2), _line_of(text, d.start()))
            tg_types.append(f"{ty}{dims}")
        found.append((name, tparams, params, end, _line_of(text, m.start()),
                      tg_types))
    return found


def _shared(match, counter):
    ty, name, dims = _tg_parts(match.group(2), 0)
    counter.append(None)
    return (f"{match.group(1)}threadgroup {ty} (&{name}){dims} = "
            f"::emu::shared<{ty}{dims}>({len(counter)});")


def rewrite(text, path, mode):
    """C++ source for `mode` 'run' or 'lint' from the kernel source `text`
    (`path` names it in the first #line directive)."""
    inserts = []
    if mode == "run":
        for name, tparams, params, end, line, tg_types in kernels(text):
            inserts.append((end, _launcher(name, tparams, params, line,
                                           tg_types)))
    for pos, add in sorted(inserts, reverse=True):
        text = text[:pos] + add + text[pos:]
    if mode == "run":
        counter = []
        text = _TG_DECL.sub(lambda m: _shared(m, counter), text)
    else:
        text = _TG_DECL.sub(r"\1static \2", text)
    text = re.sub(r"\[\[\s*kernel\s*\]\]", "", text)
    text = _ATTR.sub("", text)
    return f'#include "emu_prelude.h"\n#line 1 "{path}"\n' + text
