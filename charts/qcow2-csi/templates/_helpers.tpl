{{/*
The CSI driver name. Fixed: it is the plugin's GetPluginInfo name, the CSIDriver object's
name and the provisioner of every volume already made; volumes carry the topology key
topology.qcow2.csi.dev/node.
*/}}
{{- define "qcow2-csi.driverName" -}}
qcow2.csi.dev
{{- end }}

{{/* Name prefix for this release's objects. */}}
{{- define "qcow2-csi.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "qcow2-csi.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "qcow2-csi.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node
{{- end }}

{{- define "qcow2-csi.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "qcow2-csi.sidecarImage" -}}
{{ .repository }}:{{ .tag }}
{{- end }}

{{/* The host directory holding the plugin's socket (kubelet finds it through the registrar). */}}
{{- define "qcow2-csi.socketDir" -}}
{{ .Values.kubeletDir }}/plugins/{{ include "qcow2-csi.driverName" . }}
{{- end }}

{{- define "qcow2-csi.serviceAccountName" -}}
{{ include "qcow2-csi.fullname" . }}-node
{{- end }}
