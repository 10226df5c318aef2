// keycap's key management page. Everything works without this file; with it,
// open dialogs become modal (focus stays inside, Escape closes) and the copy
// button copies the new key.
"use strict";
document.querySelectorAll("dialog[open]").forEach(function (dialog) {
  dialog.close();
  dialog.showModal();
  dialog.addEventListener("cancel", function (event) {
    var back = dialog.querySelector("a[data-cancel]");
    if (back) { event.preventDefault(); window.location.assign(back.href); }
  });
});
document.querySelectorAll("button[data-copy]").forEach(function (button) {
  button.hidden = false;
  button.addEventListener("click", function () {
    var field = document.getElementById(button.getAttribute("data-copy"));
    var said = document.getElementById(button.getAttribute("data-copy") + "-copied");
    function done(text) { if (said) { said.textContent = text; } }
    field.select();
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(field.value).then(
        function () { done("Copied."); },
        function () { done(document.execCommand("copy") ? "Copied." : "Select the key and copy it."); }
      );
    } else {
      done(document.execCommand("copy") ? "Copied." : "Select the key and copy it.");
    }
  });
});
