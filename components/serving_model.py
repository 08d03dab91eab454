"""The file MLflow runs to build a registered backbone's pyfunc model (MLflow's "models from code").

Copied into every model the report stage logs (components/serving.py); MLflow executes it when the model loads, with
the model's copy of this package on `sys.path`. The pipeline never imports it.
"""

from mlflow.models import set_model

from components.serving import BackboneFeatures

set_model(BackboneFeatures())
