{{/* Names: <release>-headroom-controlplane unless the release is already called headroom. */}}
{{- define "headroom.fullname" -}}
{{- $name := .Values.nameOverride | default .Chart.Name -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "headroom.controlplane" -}}
{{- printf "%s-controlplane" (include "headroom.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "headroom.dashboard" -}}
{{- printf "%s-dashboard" (include "headroom.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "headroom.policies" -}}
{{- printf "%s-policies" (include "headroom.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of one component: selector labels plus chart bookkeeping. */}}
{{- define "headroom.labels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "headroom.selector" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{/* Container hardening shared by both workloads. */}}
{{- define "headroom.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "headroom.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}
