{{/* Names and labels shared by every object of the chart. */}}

{{- define "ssd300.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ssd300.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ssd300.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "ssd300.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* selector labels of one component: (dict "ctx" $ "component" "gateway") */}}
{{- define "ssd300.selector" -}}
app.kubernetes.io/name: {{ include "ssd300.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ssd300.tritonName" -}}{{ include "ssd300.fullname" . }}-triton{{- end -}}
{{- define "ssd300.gatewayName" -}}{{ include "ssd300.fullname" . }}-gateway{{- end -}}

{{- define "ssd300.claimName" -}}
{{- if .Values.model.repository.pvc.existingClaim -}}
{{- .Values.model.repository.pvc.existingClaim -}}
{{- else -}}
{{- include "ssd300.fullname" . }}-models
{{- end -}}
{{- end -}}

{{- define "ssd300.apiKeySecret" -}}
{{- if .Values.gateway.apiKey.existingSecret -}}
{{- .Values.gateway.apiKey.existingSecret -}}
{{- else if .Values.gateway.apiKey.value -}}
{{- include "ssd300.fullname" . }}-api-key
{{- end -}}
{{- end -}}

{{/* the repository as Triton sees it */}}
{{- define "ssd300.tritonRepository" -}}
{{- if eq .Values.model.repository.kind "s3" -}}
{{- with .Values.model.repository.s3 -}}
{{- if .endpoint -}}s3://{{ .endpoint }}/{{ .bucketPath }}{{- else -}}s3://{{ .bucketPath }}{{- end -}}
{{- end -}}
{{- else -}}
/models
{{- end -}}
{{- end -}}

{{/* topology spread of one component: (dict "ctx" $ "component" "gateway" "spread" .Values.gateway.topologySpread) */}}
{{- define "ssd300.topologySpread" -}}
{{- if .spread.enabled }}
topologySpreadConstraints:
  - maxSkew: {{ .spread.maxSkew }}
    topologyKey: {{ .spread.topologyKey }}
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "ssd300.selector" (dict "ctx" .ctx "component" .component) | nindent 8 }}
{{- end }}
{{- end -}}
