{{/* Chart name, overridable. */}}
{{- define "kubiot.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release name and chart name, unless the release name already contains it. */}}
{{- define "kubiot.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "kubiot.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "kubiot.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "kubiot.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "kubiot.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubiot
{{- end }}

{{/* Labels selecting the operator pod. */}}
{{- define "kubiot.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubiot.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubiot.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubiot.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kubiot.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{- define "kubiot.ingestImage" -}}
{{- printf "%s:%s" .Values.ingest.image.repository (default .Chart.AppVersion .Values.ingest.image.tag) }}
{{- end }}

{{/* Where brokers fetch a tenant's CRL: the operator's metrics Service (handlers/http.py). */}}
{{- define "kubiot.crlUrlTemplate" -}}
{{- if not .Values.metrics.enabled }}
{{- fail "broker.emqx.crlDistribution serves CRLs through the metrics Service: set metrics.enabled" }}
{{- end }}
{{- printf "http://%s-metrics.%s.svc.cluster.local:%v/crl/{tenant}.crl" (include "kubiot.fullname" .) .Release.Namespace .Values.operator.metricsPort }}
{{- end }}

{{/*
Namespace of the broker trust Secret (kubiot-broker-trust): where the broker's pods run.
*/}}
{{- define "kubiot.brokerTrustNamespace" -}}
{{- if .Values.broker.trustNamespace -}}
{{- .Values.broker.trustNamespace -}}
{{- else if eq .Values.broker.backend "emqx" -}}
{{- .Values.broker.emqx.namespace -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}
