"""Apps built on the peft_mmap library: the command line, benchmark, demo, cost measurements and the tiny CLIP.

Nothing in the library (method, multi-task and training layers) imports from here; see ARCHITECTURE.md.
"""
