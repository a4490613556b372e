output "endpoints" {
  description = "In-cluster endpoints of the broker's listeners."
  value = merge(
    var.listeners.mqtt > 0 ? { mqtt = "${local.host}:${var.listeners.mqtt}" } : {},
    contains(keys(local.listeners), "mqtts") ? { mqtts = "${local.host}:${var.listeners.mqtts}" } : {},
    contains(keys(local.listeners), "websocket") ? { websocket = "ws://${local.host}:${var.listeners.websocket}/mqtt" } : {},
    contains(keys(local.listeners), "wss") ? { wss = "wss://${local.host}:${var.listeners.wss}/mqtt" } : {},
  )
}

output "user_secrets" {
  description = "For each user, the Secret (in the broker's namespace) holding its username and generated password."
  value       = { for name, _ in var.users : name => "${name}-mqtt-credentials" }
}

output "ca_secret" {
  description = "The Secret (key ca.crt) whose CA clients trust for TLS, when the operator issues the certificate."
  value       = var.tls.enabled && var.tls.secret_name == null && var.tls.issuer_ref == null ? "cirrus-ca" : null
}

output "namespace" {
  description = "The broker's namespace."
  value       = var.namespace
}
