"""MLflow "models from code" entry: defines the pyfunc model without pickling any object.

MLflow copies this file into every logged model and runs it when the model is loaded; the
``lib`` package travels with the model as code.
"""

import mlflow

from imgcls.serving.pyfunc import ImageClassifierModel

mlflow.models.set_model(ImageClassifierModel())
