// imagestore's web UI on every page: the copy buttons beside shell lines.
// Without script the buttons stay hidden and each line can be selected by hand.
"use strict";

(function () {
  function selectText(element) {
    const range = document.createRange();
    range.selectNodeContents(element);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  // The Clipboard API where the page is a secure context (HTTPS, or the loopback);
  // elsewhere the older selection and execCommand.
  function copyText(element) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(element.textContent);
    }
    return new Promise(function (resolve, reject) {
      selectText(element);
      if (document.execCommand("copy")) {
        resolve();
      } else {
        reject(new Error("the browser refused to copy"));
      }
    });
  }

  function say(text) {
    const status = document.getElementById("copy-status");
    if (status) {
      status.textContent = text;
    }
  }

  function setUp(button) {
    const target = document.getElementById(button.dataset.copy);
    const label = document.getElementById(button.dataset.copy + "-label");
    button.hidden = false;
    button.addEventListener("click", function () {
      copyText(target).then(function () {
        button.textContent = "Copied";
        button.classList.add("done");
        say("Copied: " + (label ? label.textContent : "the line") + ".");
      }, function () {
        selectText(target);
        say("The line is selected: press Ctrl+C (or ⌘C) to copy it.");
      });
    });
    button.addEventListener("blur", function () {
      button.textContent = "Copy";
      button.classList.remove("done");
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("button[data-copy]").forEach(setUp);
  });
})();
