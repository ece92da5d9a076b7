"""The wan-lite Gradio app for local desktop generation: `python -m app [--ckpt ROOT]`.

`handlers.py` holds the behaviour (plain Python, tested without a browser), `ui.py` the layout,
`demo.py` the built-in tiny demo model used when no checkpoint is given.
"""
