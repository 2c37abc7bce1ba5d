{{/*
Chart name, overridable with nameOverride.
*/}}
{{- define "qlora-runner.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. Truncated to 63 characters because some Kubernetes name fields are
limited to that (DNS-1123 labels). The name is never doubled: a release name that already
contains the chart name is used as is ("qlora-runner", "team-a-qlora-runner"), and so is the
chart name when it starts with the release name ("qlora" -> "qlora-runner", not
"qlora-qlora-runner").
*/}}
{{- define "qlora-runner.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else if hasPrefix (printf "%s-" .Release.Name) $name }}
{{- $name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "qlora-runner.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Namespace of the release (namespaceOverride wins).
*/}}
{{- define "qlora-runner.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Namespace of the training jobs, which the operator watches unless watchAllNamespaces.
*/}}
{{- define "qlora-runner.jobsNamespace" -}}
{{- default (include "qlora-runner.namespace" .) .Values.jobs.namespace }}
{{- end }}

{{/*
Selector labels of the operator.
*/}}
{{- define "qlora-runner.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qlora-runner.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Common labels.
*/}}
{{- define "qlora-runner.labels" -}}
helm.sh/chart: {{ include "qlora-runner.chart" . }}
{{ include "qlora-runner.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: qlora-runner
{{- end }}

{{/*
Labels the renderer puts on every training pod (fixed: runner/k8s/manifests.py), which the
PodMonitor and the metrics Service select on.
*/}}
{{- define "qlora-runner.trainerSelectorLabels" -}}
app.kubernetes.io/name: qlora-runner
app.kubernetes.io/component: trainer
{{- end }}

{{/*
ServiceAccount name of the operator.
*/}}
{{- define "qlora-runner.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "qlora-runner.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Operator image (repository:tag, tag defaulting to the appVersion).
*/}}
{{- define "qlora-runner.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Training image: jobs.image fields, each falling back to the operator image.
*/}}
{{- define "qlora-runner.jobImage" -}}
{{- $repo := default .Values.image.repository .Values.jobs.image.repository }}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.jobs.image.tag }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{/*
Name of the ConfigMap holding the GPU class table.
*/}}
{{- define "qlora-runner.gpuClassesName" -}}
{{- printf "%s-gpu-classes" (include "qlora-runner.fullname" . | trunc 51 | trimSuffix "-") }}
{{- end }}

{{/*
Names of imagePullSecrets as a JSON list, for QLORA_IMAGE_PULL_SECRETS (the training pods').
*/}}
{{- define "qlora-runner.pullSecretNames" -}}
{{- $names := list }}
{{- range .Values.imagePullSecrets }}
{{- $names = append $names .name }}
{{- end }}
{{- $names | toJson }}
{{- end }}

{{/*
A probe of the operator's endpoint at `path`. On the pod network: an httpGet of the named
port. Under hostNetwork the chart declares no container port (it would be a hostPort, and the
scheduler puts no two pods with one hostPort on a node: the standby and a rolling update's
surge pod would stay Pending), so each replica binds its own port and the kubelet runs a
standard-library client in the container that asks the port written in the pod's own /tmp.
*/}}
{{- define "qlora-runner.operatorProbe" -}}
{{- if .hostNetwork -}}
exec:
  command:
    - python3
    - -I
    - -S
    - -c
    - "import http.client as h, sys; a, p = open(sys.argv[1]).read().split(':'); c = h.HTTPConnection(a, int(p), timeout=4); c.request('GET', sys.argv[2]); sys.exit(c.getresponse().status != 200)"
    - /tmp/qlora-operator-endpoint
    - {{ .path }}
{{- else -}}
httpGet:
  path: {{ .path }}
  port: http
{{- end -}}
{{- end }}
