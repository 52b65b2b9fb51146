"""The model code MLflow logs with every adapter version ("models from code": no pickled object).

MLflow copies this file into the model and runs it when the model is loaded; it names the class
that serves (:class:`loraflow.registry.serving.AdapterModel`), so a version keeps loading as long
as loraflow is installed where it is served, whatever changed in the process that registered it.
"""

import mlflow

from loraflow.registry.serving import AdapterModel

mlflow.models.set_model(AdapterModel())
