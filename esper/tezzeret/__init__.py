"""Tezzeret, the compiler: Blueprint -> kernel bundle (AOTInductor forward + backward, params, manifest).

`compile.compile_graph` / `compile_module` build, `validate.validate` checks numerics against eager,
`bench.benchmark` times it, `entrypoint.main` is the compile Job. See docs/compile-road.md for why.
"""
