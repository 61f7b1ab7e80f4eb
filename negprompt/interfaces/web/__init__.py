"""``negprompt serve``: a web page (Gradio) over the Python API.

``settings.py`` holds the server's limits (light: the command line builds its flags from them),
``handlers.py`` the work of each button as plain functions (testable without a browser), ``app.py``
the page's layout, its queue and cancel. Only ``app.py`` imports gradio, and only when serving.
"""
