// Swagger UI over the served OpenAPI document; "Authorize" takes an API key for "Try it out".
window.ui = SwaggerUIBundle({
  url: '/api/v1/openapi.json',
  dom_id: '#swagger-ui',
  deepLinking: true,
  validatorUrl: null,            // offline: no call to the public validator
  persistAuthorization: false,   // the key stays in this tab only
});
