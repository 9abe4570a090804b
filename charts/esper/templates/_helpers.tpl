{{- define "esper.name" -}}esper{{- end -}}

{{- define "esper.fullname" -}}
{{- if contains "esper" .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-esper" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "esper.labels" -}}
app.kubernetes.io/name: esper
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "esper.selectorLabels" -}}
app.kubernetes.io/name: esper
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "esper.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "esper.s3Secret" -}}
{{- if .Values.s3.existingSecret -}}{{ .Values.s3.existingSecret }}
{{- else if and .Values.s3.accessKeyId .Values.s3.secretAccessKey -}}{{ include "esper.fullname" . }}-s3
{{- end -}}
{{- end -}}


{{- define "esper.compileNamespace" -}}
{{ .Values.compileNamespace | default .Release.Namespace }}
{{- end -}}

{{- define "esper.signingSecret" -}}
{{- if .Values.signing.existingSecret -}}{{ .Values.signing.existingSecret }}
{{- else if .Values.signing.privateKey -}}{{ include "esper.fullname" . }}-signing
{{- end -}}
{{- end -}}
