{{/* The release's full name, at most 63 characters. */}}
{{- define "cirrus-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cirrus-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "cirrus-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "cirrus-operator.selectorLabels" -}}
app.kubernetes.io/name: cirrus-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cirrus-operator.labels" -}}
{{ include "cirrus-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/*
The operator's permissions: exactly the verbs it uses (see docs/operator.md
"Permissions"). A ClusterRole, or a Role when one namespace is watched.
*/}}
{{- define "cirrus-operator.rules" -}}
# Its own resources: read them, write their status.
- apiGroups: ["mqtt.cirrus.dev"]
  resources: ["mqttbrokers", "mqttusers"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["mqtt.cirrus.dev"]
  resources: ["mqttbrokers/status", "mqttusers/status"]
  verbs: ["get", "patch"]
# Children, written by server-side apply (patch); Services and Deployments
# of a managed Redis are deleted when it is turned off.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Auth, TLS, CA and generated password Secrets.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Server certificates from a cert-manager issuer (tls.issuerRef): the
# broker's Certificate, deleted when the spec stops naming an issuer.
- apiGroups: ["cert-manager.io"]
  resources: ["certificates"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# The broker pods: their connection counts (read from the pods) go into
# their pod-deletion-cost annotation, and to the custom metrics API.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "patch"]
{{- end -}}
