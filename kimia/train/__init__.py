"""Training: shared infrastructure (`common`), typed configs (`config`) and one recipe per component.

Nothing at inference time imports this package (DESIGN.md §2 layering).
"""
