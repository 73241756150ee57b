"""A user's own package, outside minratio: models and data that a minratio config names by import path.

    PYTHONPATH=examples/usernets minratio-sweep model=torch model._target_=usernets.nets.SmallResNet \\
        '+model.kwargs={n_classes: 3}' data=torch data._target_=usernets.data.blobs sweep.name=blobs
"""
