"""fluxrt.kernels: fused Triton kernels for the FLUX transformer hot paths, one op per file, each with its
`<op>_ref` in plain PyTorch beside the launcher (DESIGN.md §2). Installed as the package fluxrt.kernels."""
