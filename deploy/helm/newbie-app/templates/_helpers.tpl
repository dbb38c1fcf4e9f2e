{{/* Names and labels shared by every template. */}}
{{- define "newbie-app.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "newbie-app.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "newbie-app.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "newbie-app.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "triton"). */}}
{{- define "newbie-app.selectorLabels" -}}
app.kubernetes.io/name: {{ include "newbie-app.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "newbie-app.triton" -}}{{ include "newbie-app.fullname" . }}-triton{{- end }}
{{- define "newbie-app.fastapi" -}}{{ include "newbie-app.fullname" . }}-fastapi{{- end }}

{{/* The seed's environment table, identical in both doors. */}}
{{- define "newbie-app.modelEnv" -}}
- name: MODEL_PATH
  value: {{ .Values.model.path | quote }}
- name: QUANTIZATION_TYPE
  value: {{ .Values.model.quantizationType | quote }}
- name: ATTENTION_IMPL
  value: {{ .Values.model.attentionImpl | quote }}
- name: MAX_HISTORY
  value: {{ .Values.model.maxHistory | quote }}
- name: MAX_NEW_TOKENS
  value: {{ .Values.model.maxNewTokens | quote }}
- name: TEMPERATURE
  value: {{ .Values.model.temperature | quote }}
- name: TOP_P
  value: {{ .Values.model.topP | quote }}
- name: TRITON_MODEL_NAME
  value: {{ .Values.model.tritonModelName | quote }}
- name: MODEL_CACHE_DIR
  value: /cache
- name: HF_HOME
  value: /cache/huggingface
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "newbie-app.weightsVolume" -}}
- name: weights
{{- if .Values.weights }}
{{ toYaml .Values.weights | indent 2 }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}
